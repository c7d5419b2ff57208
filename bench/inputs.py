"""Prepared runs that benchmarks start from, built once per machine under bench/work/.

`synthetic_run("1b")`: the synthetic Llama-shaped model (bench/synthetic_model.py) taken through
02 base (local folder), 01 data (the bundled sample task), 03 4-bit quantize and 04 training for
2 iterations on every layer: what 07 fuse, 08 hf and 09 gguf need, at a real size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .harness import WORK

BENCH_CONFIG = """\
run: {run}
seed: 0
model:
  source: {source}
data:
  source: sample
  sample_rows: 120
  valid_fraction: 0.1
  test_fraction: 0.1
  max_seq_length: 256
quantize:
  enabled: true
  bits: 4
  group_size: 64
train:
  rank: 8
  alpha: 16
  targets: [attention, mlp]
  num_layers: -1
  iters: 2
  batch_size: 2
  learning_rate: 1.0e-3
  steps_per_report: 1
  steps_per_eval: 1000
  val_batches: 1
  save_every: 1000
eval:
  max_samples: 4
  max_tokens: 16
fuse:
  dequantize: true
gguf:
  quantizations: [Q8_0, Q4_K_M]
  imatrix: false
  native: false
  adapter_gguf: false
"""


def cli() -> list[str]:
    return [sys.executable, "-m", "pipeline.cli"]


def synthetic_model(size: str = "1b") -> Path:
    out = WORK / f"synthetic-{size}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "bench.synthetic_model", "--size", size, "--out", str(out)],
                       check=True)
    return out


def _source(run: str) -> str:
    return "embedded:smollm2" if run == "smollm2" else str(synthetic_model(run.removeprefix("synthetic-")))


def run_config(size: str = "1b", run: str | None = None) -> Path:
    """The config file of a benchmark run (written on first use): `synthetic-<size>` or `smollm2`."""
    run = run or f"synthetic-{size}"
    path = WORK / f"{run}.yaml"
    text = BENCH_CONFIG.format(run=run, source=_source(run))
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def run_args(size: str = "1b", run: str | None = None) -> list[str]:
    """`--config ... --run ... --models-dir ...` for any phase of a benchmark run."""
    run = run or f"synthetic-{size}"
    return ["--config", str(run_config(size, run)), "--run", run, "--models-dir", str(WORK / "runs")]


def prepared_run(run: str, phases=("base", "data", "quantize", "train")) -> Path:
    """Run `phases` of benchmark run `run` unless already done; returns the run folder."""
    outputs = {"base": "base", "data": "data", "quantize": "base-quantized", "train": "adapters"}
    run_dir = WORK / "runs" / run
    for phase in phases:
        if not (run_dir / outputs[phase] / "manifest.json").exists():
            print(f"[inputs] {phase} for the {run} run", flush=True)
            subprocess.run([*cli(), phase, *run_args(run=run)], check=True)
    return run_dir


def synthetic_run(size: str = "1b") -> Path:
    """The run folder with base/, data/, base-quantized/ and adapters/ complete (phases skip when done)."""
    return prepared_run(f"synthetic-{size}")


def smollm2_run() -> Path:
    """The embedded SmolLM2-135M with base/, data/ and base-quantized/ (no adapter)."""
    return prepared_run("smollm2", ("base", "data", "quantize"))


if __name__ == "__main__":
    print(synthetic_run(sys.argv[1] if len(sys.argv) > 1 else "1b"))
