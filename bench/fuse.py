"""07 fuse vs `mlx_lm fuse`, both ways (--de-quantize and not), and 03 quantize vs `mlx_lm convert -q`.

    python -m bench.fuse                  # fuse both ways x 2 repeats (make bench)
    python -m bench.fuse --strict         # and --no-dequantize --strict (end-to-end check measured)
    python -m bench.fuse --quantize       # and 03 quantize vs mlx_lm convert -q, x 1

Input: bench.inputs' synthetic 1.2 B Llama (bf16), its 4-bit base and 2-iteration adapter (all
layers), linked into a run of its own under bench/work/fuse/ so that fused/ of the shared run
is never touched. Ours: `mlx-pipeline fuse` with its survival checks: per layer (sampled rows), and
end to end on validation rows where 07 runs it (at 1.2 B: --de-quantize is exact per layer, so
skipped; --no-dequantize only with --strict, the `--strict` row). Anchor: `mlx_lm fuse` on the
same 4-bit base and adapter folder (mlx-lm reads our adapters/ as it is: adapters.safetensors +
adapter_config.json), `--dequantize` for the de-quantized side. Quantize: `mlx-pipeline quantize`
(4-bit, group 64) vs `mlx_lm convert -q` with the same bits and group on the same base/.
Recorded: median wall time and peak RSS and their ratios, and peak RSS / output size (the
target: <= 1.1x; wall ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import harness, inputs
from .harness import WORK, Cmd

HERE = WORK / "fuse"
MODELS = HERE / "runs"
RUN = "fuse-1b"
QUANT_RUN = "quantize-1b"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def linked_run(name: str, parts: tuple[str, ...]) -> Path:
    """bench.inputs' 1B run's folders, hard-linked into a run of our own (writers replace files by
    rename, so neither run changes the other's)."""
    source = inputs.synthetic_run("1b")
    run_dir = MODELS / name
    for part in parts:
        if not (run_dir / part / "manifest.json").exists():
            shutil.rmtree(run_dir / part, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(source / part), str(run_dir / part)], check=True)
    return run_dir


def run_args(name: str) -> list[str]:
    return ["--config", str(inputs.run_config("1b")), "--run", name, "--models-dir", str(MODELS)]


def env() -> dict[str, str]:
    """Both sides with the same BLAS (our CLI would re-exec itself with it preloaded otherwise)."""
    return {"LD_PRELOAD": OPENBLAS} if Path(OPENBLAS).exists() else {}


def removed(*paths: Path):
    def clean() -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
    return clean


def safetensors_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def with_output_ratio(name: str, row: dict, ours_out: Path, anchor_out: Path) -> dict:
    """Add each side's output size and peak RSS / output size to the recorded row."""
    for side, folder in (("ours", ours_out), ("anchor", anchor_out)):
        gb = safetensors_gb(folder)
        row[side]["output_gb"] = round(gb, 3)
        row[side]["peak_rss_x_output"] = round(row[side]["peak_rss_gb"] / gb, 3) if gb else None
    harness.record(name, row)
    return row


MODES = {"dequantize": (["--de-quantize"], ["--dequantize"]), "no-dequantize": (["--no-dequantize"], []),
         "no-dequantize-strict": (["--no-dequantize", "--strict"], [])}
WHAT = {"dequantize": "survival: per layer; end to end skipped, exact per layer",
        "no-dequantize": "survival: per layer; end to end not run above 0.5 B without --strict",
        "no-dequantize-strict": "survival: per layer and end to end (KL on 1 validation row)"}


def bench_fuse(repeats: int, modes: tuple[str, ...] = ("dequantize", "no-dequantize")) -> list[dict]:
    run_dir = linked_run(RUN, ("base", "data", "base-quantized", "adapters"))
    ours_out, anchor_out = run_dir / "fused", HERE / "mlx-lm-fused"
    rows = []
    for mode in modes:
        ours_flags, anchor_flags = MODES[mode]
        ours_flag = " ".join(ours_flags)
        ours = Cmd([*inputs.cli(), "fuse", *ours_flags, *run_args(RUN)], env=env(),
                   before=removed(ours_out), label=f"mlx-pipeline fuse {ours_flag}")
        anchor = Cmd([harness.python(), "-m", "mlx_lm", "fuse", "--model", str(run_dir / "base-quantized"),
                      "--adapter-path", str(run_dir / "adapters"), "--save-path", str(anchor_out), *anchor_flags],
                     env=env(), before=removed(anchor_out), label=f"mlx_lm fuse {' '.join(anchor_flags)}")
        name = f"fuse-{mode}"
        row = harness.compare(name, ours, anchor, repeats,
                              what=f"07 fuse {ours_flag} ({WHAT[mode]}) vs mlx_lm fuse, "
                                   "synthetic 1.2 B Llama, 4-bit base, LoRA r8 on all 7 projections x 16 layers")
        rows.append(with_output_ratio(name, row, ours_out, anchor_out))
    return rows


def bench_quantize(repeats: int) -> dict:
    run_dir = linked_run(QUANT_RUN, ("base",))
    ours_out, anchor_out = run_dir / "base-quantized", HERE / "mlx-lm-quantized"
    ours = Cmd([*inputs.cli(), "quantize", *run_args(QUANT_RUN)], env=env(),
               before=removed(ours_out), label="mlx-pipeline quantize (4-bit, group 64)")
    anchor = Cmd([harness.python(), "-m", "mlx_lm", "convert", "--hf-path", str(run_dir / "base"),
                  "--mlx-path", str(anchor_out), "-q", "--q-bits", "4", "--q-group-size", "64"],
                 env=env(), before=removed(anchor_out), label="mlx_lm convert -q --q-bits 4 --q-group-size 64")
    row = harness.compare("quantize-4bit", ours, anchor, repeats,
                          what="03 quantize 4-bit group 64 vs mlx_lm convert -q, synthetic 1.2 B Llama (bf16)")
    row = with_output_ratio("quantize-4bit", row, ours_out, anchor_out)
    base_gb = safetensors_gb(run_dir / "base")
    for side in ("ours", "anchor"):
        row[side]["peak_rss_x_input"] = round(row[side]["peak_rss_gb"] / base_gb, 3)
    harness.record("quantize-4bit", row)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | ours wall s | anchor wall s | wall ratio | ours peak GB | anchor peak GB | "
             "peak ratio | ours peak / output |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        o, a = r["ours"], r["anchor"]
        lines.append(f"| {name} | {o['wall_s']} | {a['wall_s']} | {r['ratio'].get('wall_s')} | {o['peak_rss_gb']} | "
                     f"{a['peak_rss_gb']} | {r['ratio'].get('peak_rss_gb')} | {o.get('peak_rss_x_output')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side for the fuse (interleaved)")
    ap.add_argument("--quantize-repeats", type=int, default=1)
    # Off by default: ~40 s more, and make bench has 4 minutes for this module (measured 2026-12-01,
    # shared 2-core machine at load 8-10: fuse 320 s, quantize 37 s; 03 was 0.93-1.14x, peak 0.59x input).
    ap.add_argument("--quantize", action="store_true", help="also 03 quantize vs mlx_lm convert -q")
    ap.add_argument("--strict", action="store_true",
                    help="also fuse --no-dequantize --strict (end-to-end check measured; ~15 s more per run)")
    args = ap.parse_args(argv if argv is not None else [])
    t0 = time.perf_counter()
    modes = ("dequantize", "no-dequantize") + (("no-dequantize-strict",) if args.strict else ())
    rows = list(zip((f"fuse {' '.join(MODES[m][0])}" for m in modes), bench_fuse(args.repeats, modes), strict=True))
    if args.quantize:
        rows.append(("quantize 4-bit", bench_quantize(args.quantize_repeats)))
    print(table(rows))
    print(f"[fuse] {time.perf_counter() - t0:.0f} s in all", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
