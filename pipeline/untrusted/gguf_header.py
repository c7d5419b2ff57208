"""Validate a GGUF header against the file's size before gguf-py, transformers or llama.cpp reads it.

Layout (little-endian, versions 2 and 3): "GGUF", u32 version, u64 tensor_count, u64 kv_count;
kv_count entries (string key, u32 value type, value); tensor_count tensor infos (string name,
u32 n_dims, n_dims x i64 dims, u32 ggml type, u64 offset); padding to `general.alignment`; the
tensor data. A string is a u64 length and that many bytes; an array is a u32 element type, a u64
count and the elements. Every count and length is checked against the bytes left before anything
is read or allocated, as llama.cpp's gguf reader does; values are skipped, not kept, except the few
the summary reports.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES  # ggml type id -> (block size, bytes per block)

from ..errors import UntrustedFileError

FIX = ("It is not a readable GGUF file (damaged, truncated or hostile): re-download it, "
       "or re-export it with llama.cpp's converter.")
STRING, ARRAY = 8, 9
# value type id -> size in bytes (uint8, int8, uint16, int16, uint32, int32, float32, bool, uint64, int64, float64)
SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
TYPES = {int(t) for t in GGML_QUANT_SIZES}
MIN_KV, MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8  # smallest possible entry / tensor info, in bytes
MAX_DIMS, MAX_NAME, MAX_KEY, MAX_DEPTH = 4, 63, 65535, 8  # GGML_MAX_DIMS; GGML_MAX_NAME - 1
INT64_MAX = 2**63 - 1
DEFAULT_ALIGNMENT = 32


class _Reader:
    """Reads forward through the header; every read is checked against the bytes left in the file."""

    def __init__(self, f, size: int, path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, defect: str):
        raise UntrustedFileError(f"{self.path}: {defect} (at byte {self.pos} of {self.size}). {FIX}")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            self.fail(f"{what} needs {n} bytes but only {self.left()} are left in the file")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.pos += n
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n
        self.f.seek(n, 1)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None, keep: bool = True) -> str | None:
        n = self.unpack("<Q", f"length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        if not keep:
            self.skip(n, what)
            return None
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")


def check_gguf(path: str | Path) -> dict:
    """Raise UntrustedFileError unless the whole header is consistent with the file; return a summary."""
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f, os.fstat(f.fileno()).st_size, path)
        version, n_tensors, n_kv = _preamble(r)
        meta = _metadata(r, n_kv)
        alignment = _alignment(r, meta)
        tensors, names, elements, infos = [], set(), 0, []
        for i in range(n_tensors):
            name, offset, nbytes, n, gtype = _tensor_info(r, i)
            tensors.append((name, offset, nbytes))
            infos.append((name, gtype, n, nbytes))
            if name in names:
                r.fail(f"tensor name {name!r} appears twice")
            names.add(name)
            elements += n
        data_start = -(-r.pos // alignment) * alignment
        total = _check_data(r, tensors, data_start, alignment)
    arch = meta.get("general.architecture", (None, None))[1]
    general = {k: v for k, (_, v) in meta.items() if k.startswith("general.") and v is not None}
    # tensors: (name, ggml type id, elements, bytes) in header order; general: the general.* values kept
    return {"version": version, "tensor_count": n_tensors, "kv_count": n_kv, "alignment": alignment,
            "tensors": infos, "general": general, "architecture": arch if isinstance(arch, str) else None,
            "data_offset": data_start, "tensor_data_bytes": total, "tensor_elements": elements}


def _preamble(r: _Reader) -> tuple[int, int, int]:
    magic = r.take(4, "magic")
    if magic != b"GGUF":
        r.fail(f"magic is {magic!r}, not b'GGUF'")
    version = r.unpack("<I", "version")
    if version & 0xFFFF == 0 and version:
        r.fail(f"version field reads {version:#x}: a big-endian GGUF, which this pipeline does not read")
    if version not in (2, 3):
        r.fail(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = r.unpack("<Q", "tensor count"), r.unpack("<Q", "metadata count")
    if n_tensors * MIN_TENSOR + n_kv * MIN_KV > r.left():
        r.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, which need at least "
               f"{n_tensors * MIN_TENSOR + n_kv * MIN_KV} bytes, more than the {r.left()} left: impossible counts")
    return version, n_tensors, n_kv


def _metadata(r: _Reader, n_kv: int) -> dict:
    """Key -> (value type, value); the value is kept for scalars and general.* strings only."""
    meta = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}", limit=MAX_KEY)
        if key in meta:
            r.fail(f"metadata key {key!r} appears twice")
        vtype = r.unpack("<I", f"type of {key!r}")
        meta[key] = (vtype, _value(r, vtype, key, keep=key.startswith("general.")))
    return meta


def _value(r: _Reader, vtype: int, key: str, keep: bool = False, depth: int = 0):
    if vtype in SCALAR:
        return r.unpack(SCALAR_FMT[vtype], f"value of {key!r}")
    if vtype == STRING:
        return r.string(f"value of {key!r}", keep=keep)
    if vtype != ARRAY:
        r.fail(f"metadata {key!r} has value type {vtype}, not a GGUF type (0-12)")
    if depth >= MAX_DEPTH:
        r.fail(f"metadata {key!r} nests arrays more than {MAX_DEPTH} deep")
    etype, count = r.unpack("<I", f"element type of {key!r}"), r.unpack("<Q", f"length of {key!r}")
    if etype not in SCALAR and etype not in (STRING, ARRAY):
        r.fail(f"array {key!r} has element type {etype}, not a GGUF type (0-12)")
    smallest = SCALAR.get(etype) or (8 if etype == STRING else 12)  # a string's or array's own length fields
    r.need(count * smallest, f"array {key!r} of {count} elements")
    if etype in SCALAR:
        r.skip(count * SCALAR[etype], f"array {key!r}")
    elif etype == STRING:
        _skip_strings(r, count, key)
    else:
        for _ in range(count):
            _value(r, etype, key, depth=depth + 1)
    return None


def _skip_strings(r: _Reader, count: int, key: str) -> None:
    """`count` strings of an array skipped, each length checked as `_Reader.string` checks it (a
    vocabulary holds ~50-150 k of them: this loop is that method without its per-call costs)."""
    f, size, what = r.f, r.size, f"value of {key!r}"
    for _ in range(count):
        if size - r.pos < 8:
            r.fail(f"length of {what} needs 8 bytes but only {size - r.pos} are left in the file")
        n = int.from_bytes(f.read(8), "little")
        r.pos += 8
        if n > size - r.pos:
            r.fail(f"{what} needs {n} bytes but only {size - r.pos} are left in the file")
        f.seek(n, 1)
        r.pos += n


def _alignment(r: _Reader, meta: dict) -> int:
    if "general.alignment" not in meta:
        return DEFAULT_ALIGNMENT
    vtype, value = meta["general.alignment"]
    if vtype != 4 or value <= 0 or value & (value - 1):
        r.fail(f"general.alignment must be a uint32 power of two, got {value!r} (type {vtype})")
    return value


def _tensor_info(r: _Reader, i: int) -> tuple[str, int, int, int, int]:
    """(name, offset relative to the data section, size in bytes, elements, ggml type) of tensor #i."""
    name = r.string(f"name of tensor #{i}", limit=MAX_NAME)
    n_dims = r.unpack("<I", f"n_dims of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        r.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [r.unpack("<q", f"dimensions of {name!r}") for _ in range(n_dims)]
    elements = 1
    for d in dims:
        if d <= 0:
            r.fail(f"tensor {name!r} has dimension {d} in {dims}")
        elements *= d
        if elements > INT64_MAX:
            r.fail(f"tensor {name!r}: dimensions {dims} overflow 64 bits")
    gtype = r.unpack("<I", f"type of {name!r}")
    if gtype not in TYPES:
        r.fail(f"tensor {name!r} has ggml type {gtype}, not a known type")
    block, block_bytes = GGML_QUANT_SIZES[gtype]
    if dims[0] % block:
        r.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of its type's block size {block}")
    offset = r.unpack("<Q", f"offset of {name!r}")
    return name, offset, elements // block * block_bytes, elements, gtype


def _check_data(r: _Reader, tensors: list, data_start: int, alignment: int) -> int:
    """Every tensor aligned, inside the file, and no two overlapping; returns the bytes they cover."""
    data = r.size - data_start
    end, prev = 0, None
    for name, offset, nbytes in sorted(tensors, key=lambda t: t[1]):
        if offset % alignment:
            r.fail(f"tensor {name!r} at data offset {offset} is not aligned to {alignment} bytes")
        if offset + nbytes > data:
            r.fail(f"tensor {name!r} spans data bytes {offset}-{offset + nbytes} but the file holds "
                   f"{max(data, 0)} bytes of tensor data (truncated file or bad offset)")
        if offset < end:
            r.fail(f"tensor {name!r} at data offset {offset} overlaps {prev!r}, which ends at {end}")
        end, prev = offset + nbytes, name
    return sum(t[2] for t in tensors)
