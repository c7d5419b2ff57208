"""Writing outputs so that a crash never leaves a truncated file under the final name.

Every writer goes through `atomic_path`: it writes `.NAME.tmp-PID.tmp` next to the final
name, fsyncs it and renames it into place (then fsyncs the folder, so the rename itself is
durable). Temporaries end in `.tmp` so that no `*.gguf` or `*.jsonl` glob finds a half-written
file; only writers that append an extension to names lacking it (MLX: `.safetensors`) keep
theirs. A crash leaves at most a temporary, which the next write into that folder removes
(`clean_stale`). Disk-full errors are turned into one message naming the path and the numbers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from .errors import PipelineError

# Temporaries this process is writing right now: never stale, even if an earlier process had our PID.
_ACTIVE: set[Path] = set()
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
FIX = "Free some space there, or set MODELS_DIR (--models-dir) to a disk with room, and run it again."


class DiskFullError(PipelineError):
    """Not enough room for an output, found before writing or while writing."""


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = ".tmp", expected_bytes: int | None = None,
                what: str | None = None):
    """Yield a temporary path next to `final`; move it into place only if the block succeeds.

    Works for a file or a folder. `suffix`: only for writers that append an extension to a name
    lacking it (MLX adds `.safetensors`); llama.cpp's tools and gguf-py write the name they get.
    `expected_bytes`: checked against the free space before anything is written, and used to
    report the shortfall if the disk fills up. What moves into place gets the modes of a plain
    file or folder created here (umask applied), whatever the writer used (mkstemp's 0600).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    if expected_bytes is not None:
        ensure_free_space(final.parent, expected_bytes, what or str(final))
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}{suffix}"
    _remove(tmp)
    _ACTIVE.add(tmp)
    try:
        try:
            yield tmp
            _normal_modes(tmp)
            _fsync_tree(tmp)  # data on disk before the rename can expose it
        except DiskFullError as e:  # from a nested write: name our final path, not its temporary
            raise DiskFullError(str(e).replace(str(tmp), str(final))) from None
        except Exception as e:
            if is_disk_full(e):
                raise _full_error(final, tmp, e, expected_bytes) from None
            raise
        if tmp.is_dir():
            replace_dir(tmp, final)
        else:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    finally:
        _ACTIVE.discard(tmp)
        _remove(tmp)


def replace_dir(src: Path, final: Path) -> None:
    """Move a finished folder to its final name, replacing the previous one only at the end.

    Two renames (POSIX cannot rename a folder over a non-empty one). A crash between them leaves
    `.NAME.old-PID` and no NAME; `clean_stale` then puts the previous folder back.
    """
    src, final = Path(src), Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    _ACTIVE.add(old)
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(src, final)
        _fsync_dir(final.parent)
        _remove(old)
    finally:
        _ACTIVE.discard(old)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries left in `folder` by writers that died (their PID is gone).

    A `.NAME.old-PID` whose NAME is missing is the previous output of a folder swap that was cut
    between its two renames: it is moved back rather than deleted.
    """
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    cleaned = []
    for p in entries:
        m = _STALE.match(p.name)
        if not m or p in _ACTIVE or _alive(int(m["pid"])):
            continue
        final = p.parent / m["name"]
        if m["kind"] == "old" and not final.exists() and not final.is_symlink():
            os.replace(p, final)
        else:
            _remove(p)
        cleaned.append(p)
    return cleaned


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # not in _ACTIVE: left by an earlier process that had our PID
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def _normal_modes(p: Path) -> None:
    """Modes as if created here: 0666/0777 less the umask (0644/0755 usually); executables keep x."""
    umask = os.umask(0o022)
    os.umask(umask)
    paths = [p] + (list(p.rglob("*")) if p.is_dir() and not p.is_symlink() else [])
    for f in paths:
        if f.is_symlink() or not (f.is_file() or f.is_dir()):
            continue
        if f.is_file() and f.stat().st_nlink > 1:  # hard-linked: also another folder's file, its modes stay
            continue
        mode = f.stat().st_mode & 0o7777
        full = 0o777 if f.is_dir() or mode & 0o111 else 0o666
        if mode != full & ~umask:
            os.chmod(f, full & ~umask)


def _fsync_tree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        for root, _, files in os.walk(p):
            for f in files:
                _fsync_file(Path(root) / f)
            _fsync_dir(Path(root))
    elif p.is_file():
        _fsync_file(p)


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    try:
        _fsync_file(p)
    except OSError:  # some file systems refuse fsync on a folder; the rename is still atomic
        pass


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.is_file() else 0


# --------------------------------------------------------------------------------------------
# Free space


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for us on the disk holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def needed_bytes(expected_bytes: int) -> int:
    """The expected size plus a margin (5 %, plus up to 16 MB): estimates are not exact."""
    return int(expected_bytes * 1.05) + min(int(expected_bytes), 16 << 20)


def ensure_free_space(target_dir: str | os.PathLike, expected_bytes: int, what: str) -> None:
    """Fail before writing when `what` (about `expected_bytes`) will not fit in `target_dir`.

    The previous output stays until the new one is complete, so it does not count as free.
    """
    free, needed = free_bytes(target_dir), needed_bytes(expected_bytes)
    if free < needed:
        raise DiskFullError(
            f"Not enough free disk space for {what} in {target_dir}: it needs about "
            f"{human_size(expected_bytes)} ({expected_bytes:,} bytes; {needed:,} with a safety margin), "
            f"and {human_size(free)} ({free:,} bytes) is free there: short by {needed - free:,} bytes. "
            f"Nothing was written. {FIX}"
        )


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in _FULL_ERRNOS
    # MLX's C++ writer reports a short write as RuntimeError("[write] Unable to write N bytes to file.")
    return isinstance(e, RuntimeError) and "unable to write" in str(e).lower()


def _full_error(final: Path, tmp: Path, e: BaseException, expected: int | None) -> DiskFullError:
    import resource

    written = _size(tmp)
    _remove(tmp)  # so the free space reported is what the user really has
    free = free_bytes(final.parent)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    need = (f" It needs about {expected:,} bytes: short by {max(expected - written, 0):,} bytes."
            if expected else "")
    cap = f"; the file-size limit (ulimit -f) is {limit:,} bytes" if limit != resource.RLIM_INFINITY else ""
    return DiskFullError(
        f"Could not write {final}: the disk is full or a file-size limit was reached after "
        f"{written:,} bytes ({e}).{need} Free on that disk now: {free:,} bytes{cap}. "
        f"Nothing was written under {final.name} (a previous version is unchanged). {FIX}"
    )


def check_not_inside(output: str | os.PathLike, input_: str | os.PathLike, what: str) -> None:
    """Refuse an output folder inside the input folder (or the input inside the output, which the
    phase replaces): a re-run would read its own output, or delete its input."""
    out, inp = Path(output).resolve(), Path(input_).resolve()
    if out == inp or inp in out.parents:
        raise PipelineError(
            f"The output folder {output} is inside {what} {input_}. Outputs must not be written into an "
            f"input folder: set MODELS_DIR (--models-dir) to a folder outside {input_}."
        )
    if out in inp.parents:
        raise PipelineError(
            f"{what} {input_} is inside the output folder {output}, which this phase replaces. "
            "Move the input out of it first."
        )


# --------------------------------------------------------------------------------------------
# Writers


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str):
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def jsonl_text(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: str | os.PathLike, rows) -> None:
    write_text(path, jsonl_text(rows))


# --------------------------------------------------------------------------------------------
# Hashes and sizes


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, given by path or as a file opened in binary mode (read from where it is)."""
    h = hashlib.sha256()
    with open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model folder's content hash covers: its weights and config.json."""
    path = Path(path)
    return [f for f in sorted(list(path.glob("*.safetensors")) + [path / "config.json"]) if f.exists()]


def hash_model_dir(path: str | os.PathLike, known: dict[str, str] | None = None) -> str:
    """Content identity of a model folder: its weights and config.json, not its file dates.
    `known`: sha256s already taken of some of its files, by name (taken while writing them, or
    those of the very same inodes elsewhere): a second read of a large model costs seconds."""
    h = hashlib.sha256()
    for f in model_files(path):
        h.update(f.name.encode() + b"\0" + ((known or {}).get(f.name) or sha256_file(f)).encode() + b"\n")
    return h.hexdigest()


def same_inode_hashes(folder: str | os.PathLike, source: str | os.PathLike, hashes: dict[str, str]) -> dict[str, str]:
    """Of `hashes` (sha256 of files in `source`, by name), those whose file in `folder` is the very
    same file (a hard link): they need no second read."""
    out = {}
    for name, digest in (hashes or {}).items():
        try:
            a, b = os.stat(Path(folder) / name), os.stat(Path(source) / name)
        except OSError:
            continue
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            out[name] = digest
    return out


def safetensors_numel(path: str | os.PathLike) -> int:
    """Parameters in a folder's safetensors, from their headers alone (nothing loaded)."""
    from .untrusted.safetensors_header import check_safetensors

    n = 0
    for f in Path(path).glob("*.safetensors"):
        check_safetensors(f)  # a damaged header is named, not a JSONDecodeError
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__":
                n += math.prod(v["shape"])
    return n


# Bits per weight of a GGUF type, an upper bound: small models keep embeddings/output at higher precision
# (SmolLM2-135M measured: Q8_0 8.6, Q5_K_M 6.7, Q4_K_M 6.3); plus the tokenizer and metadata per file.
_GGUF_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 9.0, "Q6_K": 7.0, "Q5_K_M": 7.0, "Q5_K_S": 7.0,
             "Q5_0": 7.0, "Q5_1": 7.0, "Q4_K_M": 7.0, "Q4_K_S": 7.0, "Q4_0": 7.0, "Q4_1": 7.0}


def gguf_size_estimate(hf_dir: str | os.PathLike, types) -> int:
    """Bytes that GGUF files of `types` made from a Hugging Face folder will take, at most."""
    n = safetensors_numel(hf_dir)
    return int(sum(n * _GGUF_BPW.get(t.upper().split("-")[0], 16) / 8 + (16 << 20) for t in types))


def dir_size(path: str | os.PathLike, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------------------------
# Sharing files between outputs, and what a run folder holds on disk


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Hard-link `src` as `dst` ("hard-linked"), or copy it where a link cannot be made (another
    file system, a link limit, a file system without links): "copied". Only for outputs whose
    writers replace files by rename (`atomic_path`), never rewrite them in place: the shared inode
    then never changes, and each side's next version gets an inode of its own."""
    try:
        os.link(src, dst)
        return "hard-linked"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    shutil.copyfile(src, dst)
    return "copied"


def same_file_system(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` (or b's nearest existing parent) are on one file system: hard links possible."""
    b = Path(b).absolute()
    while not b.exists():
        b = b.parent
    return os.stat(a).st_dev == os.stat(b).st_dev


def disk_usage(folder: str | os.PathLike) -> dict:
    """Bytes a folder holds, each file counted once however many hard links it has (as `du` does,
    in apparent size): total, and per top-level entry, where a file linked from two entries counts
    in the first (sorted) and its bytes are listed as `shared` in the others."""
    seen: dict[tuple[int, int], str] = {}
    parts: dict[str, dict] = {}
    for top in sorted(Path(folder).iterdir()):
        part = parts.setdefault(top.name, {"bytes": 0, "shared_bytes": 0})
        for f in [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*")):
            st = f.lstat()
            if not f.is_file() or f.is_symlink():
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                part["shared_bytes"] += st.st_size
            else:
                seen[key] = top.name
                part["bytes"] += st.st_size
    return {"total_bytes": sum(p["bytes"] for p in parts.values()),
            "folders": {k: v for k, v in parts.items() if v["bytes"] or v["shared_bytes"]}}


def linked_bytes(folder: str | os.PathLike, other: str | os.PathLike) -> int:
    """Bytes of the files in `folder` that are hard links of files in `other` (each counted once):
    what `folder` holds without having added it to the disk."""
    theirs = {(st.st_dev, st.st_ino) for f in Path(other).rglob("*") if f.is_file() and (st := f.stat())}
    seen, n = set(), 0
    for f in Path(folder).rglob("*"):
        if f.is_symlink() or not f.is_file():
            continue
        st = f.stat()
        key = (st.st_dev, st.st_ino)
        if key in theirs and key not in seen:
            seen.add(key)
            n += st.st_size
    return n


@contextlib.contextmanager
def scratch_file(final: str | os.PathLike):
    """A working file next to `final`, named as `atomic_path` names its temporaries (so a crash
    leaves nothing that the next write into that folder does not clean), removed on exit: for an
    intermediate, such as the unquantized GGUF the quantized files are made from, that is no output."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}.tmp"
    _remove(tmp)
    _ACTIVE.add(tmp)
    try:
        yield tmp
    finally:
        _ACTIVE.discard(tmp)
        _remove(tmp)
