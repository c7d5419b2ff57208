"""How a numbered script starts: in the project's virtualenv, with OpenBLAS preloaded, then its command.

The guides run `python3 scripts/phase4-fine-tune-model/07_fuse_lora.py ...` with whatever python3
is first on PATH. When that interpreter lacks the pipeline's dependencies and `make setup` made
.venv/, the script re-runs itself there. Standard library only: this runs before anything is known
to be importable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[1] / ".venv"


def use_project_venv() -> None:
    if all(importlib.util.find_spec(m) for m in ("mlx", "click")):
        return  # this interpreter has what the pipeline needs (an activated venv, pip install -e .)
    python = VENV / "bin" / "python"
    if python.is_file() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), *sys.orig_argv[1:]])
    sys.stderr.write(f"error: {sys.executable} has no mlx/click and there is no {python}: run `make setup` "
                     "(it creates .venv/), or `pip install -e .` into the Python you use.\n")
    raise SystemExit(2)


def run_script(name: str) -> None:
    """scripts/phaseN-*/NN_*.py: the same command as `mlx-pipeline NAME`."""
    use_project_venv()
    from .cli import run_script as run

    run(name)
