"""Training on an NVIDIA GPU: our 04 vs `mlx_lm lora`, bf16 LoRA and 4-bit QLoRA, in the same run.

    python -m bench.gpu          # needs MLX on CUDA (make setup BACKEND=cuda); elsewhere it says so and stops
    python -m bench.gpu --repeats 1   # each side once (default 2)
    python -m bench.gpu --probe bf16-lorabf16 [--memory-limit-gb 13]   # one step's speed and memory, see probe()

The synthetic 1.17 B Llama-shaped model (bench/synthetic_model.py), batch 4 x 1024 tokens of text,
LoRA r8 on the 7 projections of all 16 layers, Adam, 20 steps; tok/s are trained tokens per second
of the reports after the first (which holds compilation). MFU = tok/s x (4N + 12 L s d) / 989e12:
a frozen base costs 2N forward + 2N backward through the activations per token (N = the 1.07 B
non-embedding parameters, lm_head included), attention 12 L s d (s = 1024), H100/H200 dense bf16
peak. Peak memory is mx.get_peak_memory() as each tool reports it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from .harness import WORK, Cmd, compare
from .inputs import cli, synthetic_model

PEAK_BF16_FLOPS = 989e12
SEQ = 1024
BATCH = 4
ITERS = 20
REPORT_EVERY = 5
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GPU = WORK / "gpu"

CONFIG = """\
run: {run}
seed: 0
model:
  source: {model}
data:
  source: {data}
  valid_fraction: 0.05
  test_fraction: 0.05
  max_seq_length: {seq}
  overlong: truncate
quantize:
  enabled: {quantized}
  bits: 4
  group_size: 64
train:
  rank: 8
  alpha: 16
  dropout: 0.0
  targets: [attention, mlp]
  num_layers: -1
  iters: {iters}
  batch_size: {batch}
  learning_rate: 1.0e-5
  mask: none
  keep_best: false
  steps_per_report: {report}
  steps_per_eval: 100000
  val_batches: 1
  save_every: 100000
"""


def flops_per_token(config: dict) -> float:
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    non_embedding = n * per_layer + config["vocab_size"] * h  # lm_head counts, the embedding lookup does not
    return 4 * non_embedding + 12 * n * SEQ * h


def text_rows(path: Path, rows: int = 240, words: int = 1400) -> Path:
    """Long plain-text rows (each > 1024 tokens; 01 truncates them), the same for both stacks."""
    import numpy as np

    if path.exists():
        return path
    vocab = ("the model trains on long rows of text so every batch holds four full sequences of tokens while "
             "memory and speed are measured for both tools on one GPU with the same weights data rank layers "
             "batch and steps").split()
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in range(rows):
            f.write(json.dumps({"text": f"row {r}: " + " ".join(rng.choice(vocab, words))}) + "\n")
    return path


def prepare(kind: str, model: Path, data: Path) -> tuple[list[str], Path]:
    """Our run of `kind` (bf16 | q4) with base, data (and quantize) done; returns (its CLI args, run folder)."""
    import subprocess

    run = f"gpu-1b-{kind}"
    config = GPU / f"{run}.yaml"
    config.write_text(CONFIG.format(run=run, model=model, data=data, seq=SEQ, quantized=str(kind == "q4").lower(),
                                    iters=ITERS, batch=BATCH, report=REPORT_EVERY))
    args = ["--config", str(config), "--run", run, "--models-dir", str(GPU / "runs")]
    for phase in ("base", "data", *(["quantize"] if kind == "q4" else [])):
        subprocess.run([*cli(), phase, *args], check=True, stdout=subprocess.DEVNULL)
    return args, GPU / "runs" / run


def _after_warmup(rows: list[dict], key: str) -> float:
    later = [r[key] for r in rows[1:]] or [r[key] for r in rows]
    return statistics.median(later)


def our_figures(run_dir: Path, fpt: float):
    def read(_log: str) -> dict[str, float]:
        rows = [json.loads(x) for x in (run_dir / "adapters" / "train_log.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "tokens_per_second" in r]
        tok_s = _after_warmup(rows, "tokens_per_second")
        return {"tokens_per_s": tok_s, "mfu_percent": 100 * tok_s * fpt / PEAK_BF16_FLOPS,
                "peak_gpu_memory_gb": max(r["peak_memory_gb"] for r in rows),
                "final_train_loss": rows[-1]["train_loss"]}
    return read


def anchor_figures(log: Path, fpt: float):
    def read(_log: str) -> dict[str, float]:
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        tok_s = _after_warmup(rows, "tokens_per_second")
        return {"tokens_per_s": tok_s, "mfu_percent": 100 * tok_s * fpt / PEAK_BF16_FLOPS,
                "peak_gpu_memory_gb": max(r["peak_memory"] for r in rows), "final_train_loss": rows[-1]["train_loss"]}
    return read


def anchor_cmd(model_dir: Path, data_dir: Path, kind: str, fpt: float) -> Cmd:
    out = GPU / f"mlx-lm-{kind}"
    log = out / "report.jsonl"
    lora_config = GPU / "mlx-lm-lora.yaml"
    lora_config.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": TARGETS}}))
    argv = [sys.executable, "-m", "bench.gpu", "--anchor-log", str(log), "--",
            "--model", str(model_dir), "--train", "--data", str(data_dir), "--fine-tune-type", "lora",
            "-c", str(lora_config), "--num-layers", "-1", "--batch-size", str(BATCH), "--iters", str(ITERS),
            "--learning-rate", "1e-5", "--steps-per-report", str(REPORT_EVERY), "--steps-per-eval", "100000",
            "--val-batches", "1", "--save-every", "100000", "--max-seq-length", str(SEQ),
            "--adapter-path", str(out), "--seed", "0"]

    def before():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)

    return Cmd(argv, before=before, label=f"mlx_lm lora ({kind})", figures=anchor_figures(log, fpt))


def anchor_main(log: Path, argv: list[str]) -> None:
    """`mlx_lm lora` itself, with its own per-report figures (the dict it hands to --report-to
    callbacks: tokens/s, peak memory) written as JSON lines, since its console shows no peak memory."""
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    class JsonLines(TrainingCallback):
        def on_train_loss_report(self, info):
            with open(log, "a") as f:
                f.write(json.dumps({k: float(v) for k, v in info.items()}) + "\n")

    lora.get_reporting_callbacks = lambda *a, **k: JsonLines()
    sys.argv = ["mlx_lm.lora", *argv]
    lora.main()


PROBES = {  # name: (quantized base, dequantize + bf16 matmul, LoRA products in bf16)
    "bf16": (False, False, False), "bf16-lorabf16": (False, False, True),
    "q4deq": (True, True, False), "q4deq-lorabf16": (True, True, True), "q4qmm-lorabf16": (True, False, True),
}


def probe(name: str, memory_limit_gb: float | None = None, warm: int = 3, steps: int = 10) -> dict:
    """04's compiled step alone (mlx-lm's default_loss, Adam) on random tokens, batch 4 x 1024, LoRA r8
    on the 7 projections of all layers: tok/s and mx.get_peak_memory() after the warm-up steps. Which
    layer swaps are on is PROBES[name]; `memory_limit_gb` sets mx.set_memory_limit (see bench/GPU.md)."""
    import time
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from pipeline.modeling import load_model
    from pipeline.qlora import use_compute_dtype_lora, use_dequantized_matmul

    quantized, dequantize, lora_bf16 = PROBES[name]
    if memory_limit_gb:
        mx.set_memory_limit(int(memory_limit_gb * 1e9))
    model_dir = synthetic_model("1b")
    if quantized:
        model_dir = prepare("q4", model_dir, text_rows(GPU / "text.jsonl"))[1] / "base-quantized"
    model, _, _ = load_model(model_dir, "auto")
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": TARGETS})
    if dequantize:
        use_dequantized_matmul(model)
    if lora_bf16:
        use_compute_dtype_lora(model)
    optimizer = optim.Adam(learning_rate=1e-5)
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, n), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, n

    batch, lengths = mx.random.randint(0, 49152, (BATCH, SEQ)), mx.array([[0, SEQ]] * BATCH)
    for _ in range(warm):
        mx.eval(state, step(batch, lengths))
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(steps):
        loss, n = step(batch, lengths)
        mx.eval(state, loss, n)
    seconds = time.perf_counter() - tic
    row = {"probe": name, "memory_limit_gb": memory_limit_gb, "tokens_per_s": round(steps * n.item() / seconds),
           "step_ms": round(1000 * seconds / steps, 1), "peak_gpu_memory_gb": round(mx.get_peak_memory() / 1e9, 2)}
    print(json.dumps(row), flush=True)
    return row


def _repeats(argv: list[str]) -> int:
    """`--repeats N`: runs of each side (default 2); anything but a whole number >= 1 stops here."""
    if "--repeats" not in argv:
        return 2
    value = argv[argv.index("--repeats") + 1] if argv.index("--repeats") + 1 < len(argv) else ""
    if not value.isdigit() or int(value) < 1:
        sys.exit(f"bench.gpu: --repeats needs a whole number of runs, 1 or more (got {value or 'nothing'!r}); "
                 "e.g. `python -m bench.gpu --repeats 1`")
    return int(value)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--anchor-log":
        return anchor_main(Path(sys.argv[2]), sys.argv[4:])
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        limit = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--memory-limit-gb" else None
        probe(sys.argv[2], limit)
        return
    from pipeline.runtime import backend_name

    repeats = _repeats(sys.argv)
    if backend_name() != "cuda":
        print("bench.gpu: MLX does not run on CUDA here (no NVIDIA GPU, or mlx[cpu] installed): skipped. "
              "Recorded GPU figures: bench/GPU.md.")
        return
    model = synthetic_model("1b")
    config = json.loads((model / "config.json").read_text())
    fpt = flops_per_token(config)
    data = text_rows(GPU / "text.jsonl")
    for kind in ("bf16", "q4"):
        args, run_dir = prepare(kind, model, data)
        train_model = run_dir / ("base-quantized" if kind == "q4" else "base")
        ours = Cmd([*cli(), "train", *args], before=lambda d=run_dir: shutil.rmtree(d / "adapters", ignore_errors=True),
                   label=f"mlx-pipeline train ({kind})", figures=our_figures(run_dir, fpt))
        anchor = anchor_cmd(train_model, run_dir / "data", kind, fpt)
        compare(f"gpu-train-1b-{kind}", ours, anchor, repeats=repeats,
                what=f"04 train vs mlx_lm lora, {'4-bit QLoRA' if kind == 'q4' else 'bf16 LoRA'}, synthetic 1.17 B "
                     f"Llama, batch {BATCH} x {SEQ}, LoRA r8 on 7 projections x 16 layers, {ITERS} steps",
                extra={"command": "python -m bench.gpu" + (f" --repeats {repeats}" if repeats != 2 else ""),
                       "ours_argv": " ".join(ours.argv),
                       "anchor_argv": "mlx_lm lora " + " ".join(anchor.argv[6:]),
                       "flops_per_token": fpt, "peak_flops": PEAK_BF16_FLOPS})


if __name__ == "__main__":
    main()
