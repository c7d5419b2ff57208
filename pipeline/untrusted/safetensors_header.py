"""Validate a .safetensors header the way the reference library (huggingface/safetensors) does.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer.
The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative
to the buffer) plus an optional "__metadata__" of str -> str. The reference library requires the
tensors to tile the buffer exactly: sorted by offset, each begins where the previous ended, sizes
match dtype x shape, and the last ends at the end of the file. Only the header is read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import UntrustedFileError

MAX_HEADER = 100_000_000  # the reference library's limit (HeaderTooLarge)
FIX = "The file is damaged or not a safetensors file: delete it and re-download or re-export it."

# dtype -> bits per element (the reference library's Dtype::bitsize)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
U64_MAX = 2**64 - 1


def _fail(path, defect: str):
    raise UntrustedFileError(f"{path}: {defect}. {FIX}")


def check_safetensors(path: str | Path) -> dict:
    """Raise UntrustedFileError unless the header is valid; return {tensor name: (begin, end)}."""
    header, _ = read_header(path)
    return {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def read_header(path: str | Path) -> tuple[dict, int]:
    """The validated header as the file holds it ({tensor name: {"dtype", "shape", "data_offsets"}},
    "__metadata__" when present) and its size in bytes (8 + the JSON's length: what is not tensor data)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            _fail(path, f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        if n > size - 8:
            _fail(path, f"header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    header = _parse(path, raw)
    tensors = {k: _tensor(path, k, v) for k, v in header.items() if k != "__metadata__"}
    _check_metadata(path, header.get("__metadata__"))
    _check_layout(path, tensors, size - 8 - n)
    return header, 8 + n


def _parse(path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(path, f"header is not UTF-8 (byte {e.start})")
    if not text.startswith("{"):
        _fail(path, "header does not start with '{' (not a JSON object)")

    def no_duplicates(pairs):  # a second entry under one name could hide a tensor
        out = {}
        for k, v in pairs:
            if k in out:
                _fail(path, f"header repeats the key {k[:80]!r}")
            out[k] = v
        return out

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        _fail(path, f"header is not valid JSON ({type(e).__name__}: {str(e)[:120]})")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    return header


def _uint(v) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX  # bool is an int subclass: excluded by `type is`


def _tensor(path, name: str, info) -> tuple[int, int]:
    """(begin, end) of one tensor after checking its dtype, shape and byte size."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        _fail(path, f"{where} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        _fail(path, f"{where} has unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        _fail(path, f"{where} has shape {str(shape)[:80]}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)):
        _fail(path, f"{where} has data_offsets {str(offsets)[:80]}, not [begin, end]")
    begin, end = offsets
    if end < begin:
        _fail(path, f"{where} ends (byte {end}) before it begins (byte {begin})")
    bits = DTYPE_BITS[dtype]
    for d in shape:
        bits *= d
        if bits > U64_MAX:
            _fail(path, f"{where}: shape {shape} x {dtype} overflows 64 bits")
    if bits % 8:
        _fail(path, f"{where}: {shape} x {dtype} is not a whole number of bytes")
    if bits // 8 != end - begin:
        _fail(path, f"{where}: shape {shape} x {dtype} is {bits // 8} bytes but data_offsets span {end - begin}")
    return begin, end


def _check_metadata(path, meta) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail(path, "__metadata__ must map strings to strings")


def _check_layout(path, tensors: dict, buffer: int) -> None:
    """Tensors must tile the data buffer: no gap, no overlap, ending exactly at the file's end."""
    pos = 0
    for name, (begin, end) in sorted(tensors.items(), key=lambda kv: kv[1]):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap after the previous tensor"
            _fail(path, f"tensor {name!r} begins at byte {begin} of the data but the previous ends at {pos}: it {what}")
        pos = end
    if pos != buffer:
        _fail(path, f"tensors cover {pos} bytes but the data buffer is {buffer} bytes (truncated or padded file)")
