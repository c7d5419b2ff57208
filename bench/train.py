"""04 train vs `mlx_lm lora`: same model, data, rank, layers, batch size, learning rate, steps.

Two anchors, each interleaved with ours:
- `mlx_lm lora` as a user runs it, on the bf16 base (mlx-lm trains in the weights' dtype);
- `mlx_lm lora` on a float32 copy of the base with OpenBLAS preloaded: the arithmetic our CPU path
  does, so the ratio isolates our loop, batching and checkpointing from the dtype choice.
Both on full-precision SmolLM2-135M (LoRA). QLoRA against mlx-lm's 4-bit path is not measured on
CPU: mlx-lm's first validation batch alone takes ~380 s there (bf16 quantized matmul).
Figures: tokens/s of trained (unmasked) tokens as each tool reports it (mean over the reports
of 4 steps), the last report's training loss (the data order differs between the tools, so the
losses are comparable in size, not equal), wall time of the whole command and peak RSS.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from .harness import WORK, Cmd, compare, venv_bin
from .inputs import cli, run_args, smollm2_run

SETTINGS = {"iters": 8, "batch_size": 4, "num_layers": 8, "rank": 8, "alpha": 16.0, "learning_rate": 2e-4}
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def _ours(run_dir, iters: int) -> Cmd:
    def clean():
        for d in ("adapters", ".adapters.partial", "checkpoints"):
            shutil.rmtree(run_dir / d, ignore_errors=True)

    def figures(_log: str) -> dict:
        rows = [json.loads(x) for x in (run_dir / "adapters" / "train_log.jsonl").read_text().splitlines()]
        train = [r for r in rows if "train_loss" in r]
        # trained tokens per second over each report's window, as mlx-lm's tok/s (its masked count).
        rates = [r["trained_tokens_per_second"] for r in train]
        return {"trained_tokens_per_s": sum(rates) / len(rates), "final_train_loss": train[-1]["train_loss"]}

    s = SETTINGS
    argv = [*cli(), "train", *run_args(run="smollm2"), "--no-quantized", "--iters", str(iters),
            "--batch-size", str(s["batch_size"]), "--num-layers", str(s["num_layers"]), "--rank", str(s["rank"]),
            "--alpha", str(s["alpha"]), "--learning-rate", str(s["learning_rate"]), "--steps-per-report", "4"]
    return Cmd(argv, before=clean, label="mlx-pipeline train (float32 on CPU)",
               figures=figures)


def lora_config(name: str, s: dict):
    """mlx_lm lora's config file for our `attention,mlp` preset at the settings' rank and alpha."""
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    config = WORK / name
    config.write_text(json.dumps({"lora_parameters": {"keys": keys, "rank": s["rank"],
                                                      "scale": s["alpha"] / s["rank"], "dropout": 0.0}}))
    return config


def mlx_lm_report(log: str) -> tuple[list, list[float]]:
    """mlx-lm 0.32's table rows "iter  train_loss  tok/s  tokens" (tok/s over the report window)
    and its printed validation losses ("  40    val 2.386    53.30s")."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    rows = re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+\S?\s+([0-9.]+)\s+([0-9.]+)(k?)\s*$", plain, re.M)
    if not rows:
        raise RuntimeError(f"no training report in mlx_lm's output:\n{plain[-1500:]}")
    return rows, [float(v) for v in re.findall(r"^\s*\d+\s+val\s+([0-9.]+)", plain, re.M)]


def _mlx_lm(model_dir, data_dir, label: str, env: dict, iters: int) -> Cmd:
    out = WORK / "train-anchor-adapters"
    s = SETTINGS
    config = lora_config("mlx_lm_lora.yaml", s)

    def figures(log: str) -> dict:
        rows, _ = mlx_lm_report(log)
        rates = [float(r[2]) for r in rows]
        return {"trained_tokens_per_s": sum(rates) / len(rates), "final_train_loss": float(rows[-1][1])}

    argv = [venv_bin("python"), "-m", "mlx_lm", "lora", "--model", str(model_dir), "--train", "--data", str(data_dir),
            "-c", str(config), "--iters", str(iters), "--batch-size", str(s["batch_size"]),
            "--num-layers", str(s["num_layers"]), "--learning-rate", str(s["learning_rate"]), "--mask-prompt",
            "--steps-per-report", "4", "--steps-per-eval", "1000", "--val-batches", "1",
            "--adapter-path", str(out), "--seed", "0", "--save-every", "1000"]
    return Cmd(argv, env=env, before=lambda: shutil.rmtree(out, ignore_errors=True), label=label, figures=figures)


def main() -> None:
    run_dir = smollm2_run()
    f32 = WORK / "smollm2-base-f32"
    if not (f32 / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(run_dir / "base"),
                        "--mlx-path", str(f32), "--dtype", "float32"], check=True)
    iters = SETTINGS["iters"]
    what = (f"LoRA on SmolLM2-135M, batch {SETTINGS['batch_size']}, last {SETTINGS['num_layers']} layers, "
            f"7 projections, rank {SETTINGS['rank']}; CPU")
    compare("train-vs-mlx_lm-float32", _ours(run_dir, iters),
            _mlx_lm(f32, run_dir / "data", "mlx_lm lora, float32 weights + OpenBLAS", {"LD_PRELOAD": OPENBLAS}, iters),
            repeats=2, what=f"{what}, {iters} steps; anchor given our float32 arithmetic")
    # bf16 on CPU is ~10x slower: half the steps, once, to stay within make bench's budget.
    compare("train-vs-mlx_lm-bf16", _ours(run_dir, iters // 2),
            _mlx_lm(run_dir / "base", run_dir / "data", "mlx_lm lora as installed (bf16 weights)", {}, iters // 2),
            repeats=1, what=f"{what}, {iters // 2} steps; anchor as a user runs it")


if __name__ == "__main__":
    main()
