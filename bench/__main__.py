"""`make bench` / `python -m bench [NAME ...]`: every benchmark in turn, then the results table.

Each benchmark module runs our phase and the tool a user would otherwise run on the same input,
interleaved, and records wall time, peak RSS and ratios in bench/results/<machine>.json.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

# Cheapest first; `gpu` runs only where an NVIDIA GPU is (see bench/GPU.md).
BENCHES = ("train", "fuse", "export", "verify")


def main(names: list[str]) -> int:
    from . import report

    failed = []
    for name in names or BENCHES:
        t0 = time.perf_counter()
        print(f"\n=== bench {name} ===", flush=True)
        try:
            importlib.import_module(f"bench.{name}").main()
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
