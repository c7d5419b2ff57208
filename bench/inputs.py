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


def run_config(size: str = "1b") -> Path:
    """The config file of the synthetic run (written on first use)."""
    path = WORK / f"synthetic-{size}.yaml"
    text = BENCH_CONFIG.format(run=f"synthetic-{size}", source=synthetic_model(size))
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def run_args(size: str = "1b") -> list[str]:
    """`--config ... --run ... --models-dir ...` for any phase of the synthetic run."""
    return ["--config", str(run_config(size)), "--run", f"synthetic-{size}", "--models-dir", str(WORK / "runs")]


def synthetic_run(size: str = "1b") -> Path:
    """The run folder with base/, data/, base-quantized/ and adapters/ complete (phases skip when done)."""
    run_dir = WORK / "runs" / f"synthetic-{size}"
    for phase, out in (("base", "base"), ("data", "data"), ("quantize", "base-quantized"), ("train", "adapters")):
        if not (run_dir / out / "manifest.json").exists():
            print(f"[inputs] {phase} for the synthetic {size} run", flush=True)
            subprocess.run([*cli(), phase, *run_args(size)], check=True)
    return run_dir


if __name__ == "__main__":
    print(synthetic_run(sys.argv[1] if len(sys.argv) > 1 else "1b"))
