"""`make bench` / `python -m bench [NAME ...]`: every benchmark in turn, then the results table.

Each benchmark module runs our phase and the tool a user would otherwise run on the same input,
interleaved, and records wall time, peak RSS and ratios in bench/results/<machine>.json.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import traceback

# Cheapest first, with the arguments that keep `make bench` within ~20 minutes on 2 cores.
# Also runnable alone: `python -m bench.<name> --help`. `gpu` needs an NVIDIA GPU (bench/GPU.md);
# `demo` times the whole `make demo` (~20 minutes).
BENCHES = {"train": [], "train_skewed": [], "fuse": [], "export": [], "verify": ["--repeats", "1"], "gpu": [],
           "demo": []}
DEFAULT = ("train", "train_skewed", "fuse", "export", "verify")


def main(names: list[str]) -> int:
    from . import report

    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
        return 2
    failed = []
    for name in names or DEFAULT:
        t0 = time.perf_counter()
        print(f"\n=== bench {name} ===", flush=True)
        try:
            main_of = importlib.import_module(f"bench.{name}").main
            main_of(BENCHES[name]) if inspect.signature(main_of).parameters else main_of()
        except Exception:  # one failing benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
        print(f"=== bench {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    report.main()
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
