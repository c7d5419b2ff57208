"""The small JSON file each phase writes beside its output; the next phase reads it.

A phase's output is complete only when its manifest exists, so `make` targets key on it.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from .errors import MissingInputError
from .fsio import write_json

MANIFEST = "manifest.json"
_PACKAGES = ["mlx", "mlx-lm", "transformers", "gguf", "huggingface-hub", "torch"]


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(out_dir: str | Path, phase: str, cfg, started: float, inputs: dict, outputs: dict, **extra) -> Path:
    path = Path(out_dir) / MANIFEST
    write_json(
        path,
        {
            "phase": phase,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 2),
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else cfg,
            "inputs": inputs,
            "outputs": outputs,
            **extra,
            "versions": versions(),
        },
    )
    return path


def read_manifest(out_dir: str | Path, make_target: str) -> dict:
    """Read a finished phase's manifest, or fail naming the command that produces it."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise MissingInputError(
            f"{out_dir} is missing or incomplete (no {MANIFEST}). "
            f"Run `make {make_target}` (or `mlx-pipeline {make_target}`) first."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MissingInputError(f"{path} is corrupt ({e}). Delete {out_dir} and run `make {make_target}` again.") from None


def is_current(recorded_hash: str | None, producer: dict) -> bool:
    """Whether an output was made from the producer's current output (its content hash)."""
    return bool(recorded_hash) and recorded_hash == producer.get("outputs", {}).get("content_hash")
