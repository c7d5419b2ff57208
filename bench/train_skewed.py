"""04 train vs `mlx_lm lora` on data whose lengths are skewed: 90 % short chats, 10 % long ones.

Same model (SmolLM2-135M, float32 weights for both, OpenBLAS preloaded for both), same splits,
rank, layers, batch, learning rate and steps; the loss on the answer only (our `train.mask: last`,
mlx-lm's `--mask-prompt`: on single-turn chats both are the answer). Figures: padding % (ours, from
its log; mlx-lm's computed from its batching rule on the same lengths), useful (trained) tokens per
second as each tool reports them, and the validation loss of each trained adapter over the whole
valid split, computed by one evaluator for both (ours: mlx-lm's own loss counts one padding target
per row, ml-explore/mlx-lm PR #1697, so the losses the tools print do not compare).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

from .harness import WORK, Cmd, compare, venv_bin
from .inputs import cli
from .train import OPENBLAS, lora_config, mlx_lm_report

RUN = "skewed"
SETTINGS = {"iters": 40, "batch_size": 4, "num_layers": 8, "rank": 8, "alpha": 16.0, "learning_rate": 2e-4}
WORDS = ("river stone lamp market garden winter copper signal harbor violet engine ladder orbit canvas "
         "meadow thunder pocket silver bridge candle forest velvet rocket marble").split()


def skewed_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Short questions with one-word answers, and one row in ten a long passage to summarise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.1:
            passage = " ".join(rng.choice(WORDS) for _ in range(rng.randint(180, 300)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
            rows.append({"messages": [{"role": "user", "content": f"Summarise: {passage}"},
                                      {"role": "assistant", "content": answer}]})
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}? ({rng.choice(WORDS)})"},
                                      {"role": "assistant", "content": f"{a + b}."}]})
    return rows


def prepared() -> tuple:
    """The run folder (base/, data/ split by our 01) and the float32 base for both tools."""
    models = WORK / "runs"
    run_dir = models / RUN
    data_file = WORK / "skewed.jsonl"
    if not data_file.exists():
        data_file.write_text("".join(json.dumps(r) + "\n" for r in skewed_rows()))
    args = ["--run", RUN, "--models-dir", str(models)]
    for phase, out, extra in (("base", "base", []), ("data", "data", ["--data", str(data_file)])):
        if not (run_dir / out / "manifest.json").exists():
            subprocess.run([*cli(), phase, *args, *extra], check=True)
    f32 = WORK / "smollm2-base-f32"
    if not (f32 / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(run_dir / "base"),
                        "--mlx-path", str(f32), "--dtype", "float32"], check=True)
    return run_dir, f32


def mlx_lm_padding(run_dir, batch_size: int) -> float:
    """mlx-lm's padding on these rows: sorted by length, batches padded to 1 + a multiple of 32."""
    from transformers import AutoTokenizer

    from pipeline.data.trained_tokens import encode_rows

    tok = AutoTokenizer.from_pretrained(str(run_dir / "base"))
    rows = [json.loads(x) for x in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    lengths = sorted(len(e.ids) for e in encode_rows(rows, tok, "last"))
    real = padded = 0
    for i in range(0, len(lengths) - batch_size + 1, batch_size):
        batch = lengths[i:i + batch_size]
        width = 1 + 32 * ((max(batch) + 31) // 32)
        real += sum(n - 1 for n in batch)
        padded += batch_size * (width - 1)
    return round(100 * (1 - real / padded), 2)


def val_loss(f32, adapter_dir, run_dir) -> float:
    """The answer-token loss of base + adapter over the valid split (pipeline.trainer.evaluate)."""
    from mlx_lm import load

    from pipeline.batching import validation_batches
    from pipeline.data.trained_tokens import encode_rows
    from pipeline.trainer import evaluate

    model, tok = load(str(f32), adapter_path=str(adapter_dir))
    rows = [json.loads(x) for x in (run_dir / "data" / "valid.jsonl").read_text().splitlines()]
    enc = encode_rows(rows, tok, "last")
    return round(evaluate(model, enc, validation_batches([len(e.ids) for e in enc], 4, -1), 2048), 4)


def _ours(run_dir, f32) -> Cmd:
    s = SETTINGS

    def clean():
        for d in ("adapters", ".adapters.partial"):
            shutil.rmtree(run_dir / d, ignore_errors=True)

    def figures(_log: str) -> dict:
        rows = [json.loads(x) for x in (run_dir / "adapters" / "train_log.jsonl").read_text().splitlines()]
        train = [r for r in rows if "train_loss" in r]
        return {"trained_tokens_per_s": sum(r["trained_tokens_per_second"] for r in train) / len(train),
                "padding_percent": sum(r["padding_percent"] for r in train) / len(train),
                "val_loss": val_loss(f32, run_dir / "adapters", run_dir)}

    argv = [*cli(), "train", "--run", RUN, "--models-dir", str(WORK / "runs"), "--no-quantized",
            "--iters", str(s["iters"]), "--batch-size", str(s["batch_size"]), "--num-layers", str(s["num_layers"]),
            "--rank", str(s["rank"]), "--alpha", str(s["alpha"]), "--learning-rate", str(s["learning_rate"]),
            "--mask", "last", "--steps-per-report", "10", "--steps-per-eval", str(s["iters"]), "--val-batches", "-1",
            "--save-every", "1000", "--no-keep-best", "--compute-dtype", "float32"]
    return Cmd(argv, env={"LD_PRELOAD": OPENBLAS}, before=clean, label="mlx-pipeline train (bucketed)",
               figures=figures)


def _mlx_lm(run_dir, f32) -> Cmd:
    s = SETTINGS
    out = WORK / "skewed-anchor-adapters"
    config = lora_config("mlx_lm_lora_skewed.yaml", s)

    def figures(log: str) -> dict:
        rows, vals = mlx_lm_report(log)
        return {"trained_tokens_per_s": sum(float(r[2]) for r in rows) / len(rows),
                "val_loss": val_loss(f32, out, run_dir), "val_loss_as_mlx_lm_prints": float(vals[-1])}

    argv = [venv_bin("python"), "-m", "mlx_lm", "lora", "--model", str(f32), "--train",
            "--data", str(run_dir / "data"), "-c", str(config), "--iters", str(s["iters"]),
            "--batch-size", str(s["batch_size"]), "--num-layers", str(s["num_layers"]),
            "--learning-rate", str(s["learning_rate"]), "--mask-prompt", "--steps-per-report", "10",
            "--steps-per-eval", str(s["iters"]), "--val-batches", "-1", "--adapter-path", str(out),
            "--seed", "0", "--save-every", "1000"]
    return Cmd(argv, env={"LD_PRELOAD": OPENBLAS}, before=lambda: shutil.rmtree(out, ignore_errors=True),
               label="mlx_lm lora, float32 weights + OpenBLAS", figures=figures)


def main(argv: list[str] | None = None) -> None:
    run_dir, f32 = prepared()
    s = SETTINGS
    what = (f"LoRA on SmolLM2-135M (float32), 400 chats: 90 % short, 10 % long (~300-450 tokens); batch "
            f"{s['batch_size']}, last {s['num_layers']} layers, rank {s['rank']}, {s['iters']} steps; CPU")
    compare("train-skewed-vs-mlx_lm", _ours(run_dir, f32), _mlx_lm(run_dir, f32), repeats=2, what=what,
            extra={"mlx_lm_padding_percent": mlx_lm_padding(run_dir, s["batch_size"])})


if __name__ == "__main__":
    main()
