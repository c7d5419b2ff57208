"""Writing outputs so that a crash never leaves a truncated file under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to `final`; move it into place only if the block succeeds.

    Works for a file or a folder. `suffix` keeps an extension that writers append
    (MLX adds `.safetensors` to names that lack it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}{suffix}"
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, final)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)


def replace_dir(src: Path, final: Path) -> None:
    """Move a finished folder to its final name, replacing the previous one only at the end."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(src, final)
    _remove(old)


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_text(path: str | os.PathLike, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_model_dir(path: str | os.PathLike) -> str:
    """Content identity of a model folder: its weights and config.json, not its file dates."""
    path = Path(path)
    files = sorted(list(path.glob("*.safetensors")) + [path / "config.json"])
    h = hashlib.sha256()
    for f in files:
        if f.exists():
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def dir_size(path: str | os.PathLike, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
