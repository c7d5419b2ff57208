"""The small JSON file each phase writes beside its output; the next phase reads it.

A phase's output is complete only when its manifest exists, so `make` targets key on it.
Reading a manifest also checks that the files it vouches for are still the ones the phase wrote:
every output recorded as {"path", "sha256"} (data splits, GGUF files) and, for a model folder, its
`content_hash` (weights + config.json, `fsio.hash_model_dir`).

Cost, measured on SmolLM2-135M's base (269 MB): a full hash takes 0.19 s with the file in the
page cache (0.73 s the first time), ~0.7 s per GB; a 3B-8B model (6-16 GB) would cost 5-15 s on every
read, and phases 08-10 read 2-4 manifests each. So files and model folders up to HASH_ALWAYS are
re-hashed on every read (data splits, in practice, always), while larger ones are re-hashed only when a file's
size or mtime differs from `file_stats`, recorded at write time (0.2 ms): any edit changes the mtime,
and the full hash then decides (a copy with new dates but the same bytes still passes).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from .errors import MissingInputError, PipelineError
from .fsio import hash_model_dir, model_files, sha256_file, write_json

MANIFEST = "manifest.json"
_PACKAGES = ["mlx", "mlx-lm", "transformers", "gguf", "huggingface-hub", "torch"]
HASH_ALWAYS = 64 << 20  # bytes: at or below, re-hash on every read (data splits always are)


class ChangedOutputError(PipelineError):
    """A file changed after the phase that wrote it recorded its hash."""


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(out_dir: str | Path, phase: str, cfg, started: float, inputs: dict, outputs: dict,
                   name: str = MANIFEST, **extra) -> Path:
    """`name`: another file name, for outputs that are files beside others' (09's PREFIX-*.gguf)."""
    path = Path(out_dir) / name
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
            "file_stats": _file_stats(Path(out_dir), outputs),
            "versions": versions(),
        },
    )
    return path


def read_manifest(out_dir: str | Path, make_target: str, verify: bool = True) -> dict:
    """Read a finished phase's manifest, or fail naming the command that produces it.

    `verify`: also fail when a file the manifest vouches for changed since (see the module doc).
    """
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise MissingInputError(
            f"{out_dir} is missing or incomplete (no {MANIFEST}). "
            f"Run `make {make_target}` (or `mlx-pipeline {make_target}`) first."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MissingInputError(f"{path} is corrupt ({e}). Delete {out_dir} and run `make {make_target}` "
                                "again.") from None
    if verify:
        verify_outputs(out_dir, manifest, make_target)
    return manifest


def read_adapter_manifest(adapters: str | Path, kind: str) -> dict:
    """The 04 manifest of a training output folder, checking the adapter file 05-10 load: for `kind`
    "best" adapters/best/adapters.safetensors against outputs.best, for "last" adapters.safetensors
    against outputs.adapter_file (paths.AdapterChoice). The other one is not read."""
    adapters = Path(adapters)
    manifest = read_manifest(adapters, "train", verify=False)
    outputs = manifest.get("outputs") or {}
    use_last = " Or use the last step's adapter: --adapter last (ADAPTER=last)."
    if kind == "best" and not isinstance(outputs.get("best"), dict):
        raise ChangedOutputError(
            f"{adapters / 'best'} is not recorded in {adapters / MANIFEST} (no outputs.best): this run's training "
            f"did not write it. Re-run `make train` (or `mlx-pipeline train`) to make it again.{use_last}")
    other = "adapter_file" if kind == "best" else "best"
    try:
        verify_outputs(adapters, {**manifest, "outputs": {k: v for k, v in outputs.items() if k != other}}, "train")
    except ChangedOutputError as e:
        raise ChangedOutputError(str(e) + (use_last if kind == "best" else "")) from None
    return manifest


def verify_outputs(out_dir: str | Path, manifest: dict, make_target: str) -> None:
    out_dir, outputs = Path(out_dir), manifest.get("outputs") or {}
    stats = manifest.get("file_stats") or {}
    changed = []
    for entry in _hashed(outputs):
        f = _local(out_dir, entry["path"])
        if not f.is_file():
            changed.append(f"{f} is missing")
        elif _stat(f) != stats.get(_key(out_dir, f)) or f.stat().st_size <= HASH_ALWAYS:
            if (now := sha256_file(f)) != entry["sha256"]:
                changed.append(f"{f} (sha256 {entry['sha256'][:12]}... when written, now {now[:12]}...)")
    if recorded := outputs.get("content_hash"):
        now = {_key(out_dir, f): _stat(f) for f in model_files(out_dir)}
        then = {k: v for k, v in stats.items() if k == "config.json" or k.endswith(".safetensors")}
        diff = [f"{k} {'added' if k not in then else 'removed' if k not in now else 'modified'}"
                for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        big = sum(s[0] for s in now.values()) > HASH_ALWAYS
        if (diff or not then or not big) and (actual := hash_model_dir(out_dir)) != recorded:
            changed.append(f"{', '.join(diff) or 'its weights or config.json'} (content hash "
                           f"{recorded[:12]}... when written, now {actual[:12]}...)")
    if changed:
        raise ChangedOutputError(
            f"{out_dir} changed since phase {manifest.get('phase', make_target)} wrote it: {'; '.join(changed)}. "
            f"Re-run `make {make_target}` (or `mlx-pipeline {make_target}`) to make it again; to use edited "
            "files, give them to that phase as its input instead of editing its output."
        )


def _hashed(outputs):
    """Every {"path", "sha256"} record in a manifest's outputs, at any depth."""
    if isinstance(outputs, dict):
        if isinstance(outputs.get("path"), str) and isinstance(outputs.get("sha256"), str):
            yield outputs
        for v in outputs.values():
            yield from _hashed(v)
    elif isinstance(outputs, list):
        for v in outputs:
            yield from _hashed(v)


def _local(out_dir: Path, recorded: str) -> Path:
    """The recorded file in the manifest's folder (recorded paths go stale when a run folder is
    moved, or point at the final name while the manifest is written in a temporary folder): the
    longest tail of the recorded path found there, so that a file in a sub-folder (adapters/best/
    adapters.safetensors) is not mistaken for the one of the same name beside the manifest."""
    parts = Path(recorded).parts
    for n in range(len(parts) - (1 if Path(recorded).anchor else 0), 0, -1):
        p = out_dir.joinpath(*parts[-n:])
        if p.exists():
            return p
    return Path(recorded)


def _key(out_dir: Path, f: Path) -> str:
    """A file's name in file_stats: its path relative to the manifest's folder when inside it."""
    try:
        return f.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(f)


def _stat(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns]


def _file_stats(out_dir: Path, outputs: dict) -> dict:
    """Size and mtime of each file the outputs vouch for (the cheap first check on read)."""
    files = [f for e in _hashed(outputs) if (f := _local(out_dir, e["path"])).is_file()]
    if outputs.get("content_hash"):
        files += model_files(out_dir)
    return {_key(out_dir, f): _stat(f) for f in files}


def is_current(recorded_hash: str | None, producer: dict) -> bool:
    """Whether an output was made from the producer's current output (its content hash)."""
    return bool(recorded_hash) and recorded_hash == producer.get("outputs", {}).get("content_hash")
