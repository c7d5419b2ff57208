"""The whole `make demo` from an empty models folder: wall time, peak RSS, seconds per phase (from
each phase's manifest) and the run folder's size against its base model's. No anchor tool does the
whole chain; the per-phase benchmarks carry the ratios. ~20 minutes on 2 cores, so `make bench`
leaves it out: `make bench BENCH=demo`.
"""

from __future__ import annotations

import json
import shutil

from .harness import ROOT, WORK, Cmd, compare

PHASES = ("base", "data", "base-quantized", "adapters", "eval", "fused", "hf", "gguf", "verify")


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> None:
    models = WORK / "demo-models"
    run_dir = models / "demo"

    def figures(_log: str) -> dict:
        out = {}
        for phase in PHASES:
            m = run_dir / phase / "manifest.json"
            if m.exists():
                out[f"seconds_{phase}"] = float(json.loads(m.read_text()).get("seconds", 0.0))
        base, total = _size(run_dir / "base"), _size(run_dir)
        out.update(run_folder_gb=total / 1e9, run_folder_x_base=total / base)
        return out

    cmd = Cmd(["make", "-C", str(ROOT), "demo", f"MODELS_DIR={models}"],
              before=lambda: shutil.rmtree(models, ignore_errors=True), label="make demo", figures=figures)
    compare("demo", cmd, None, repeats=1, what="make demo from an empty models folder (setup already done)")


if __name__ == "__main__":
    main()
