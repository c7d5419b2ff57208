"""An MLX model folder as a Hugging Face folder: dense weights by name, the config without its
quantization, safetensors shards, the tokenizer files copied byte for byte. Phases 07 and 08 and
the LoRA GGUF's base (pipeline/adapter_gguf.py) share it.

Bounded memory: shards are written tensor by tensor (the header first: shapes and dtypes are known
before anything is computed), a dequantized tensor a block of rows at a time, and every array is
dropped once written. A folder whose tensors the export would write unchanged (a de-quantized
fuse in the export dtype) is not written again: its files are hard-linked (`shared_files`).
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

from .errors import PipelineError
from .fsio import link_or_copy, write_json

INDEX = "model.safetensors.index.json"
# What a model folder carries besides weights and config.json; copied byte for byte.
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "*.tiktoken", "chat_template*", "generation_config.json"]


def tokenizer_files(src: Path) -> list[Path]:
    """Tokenizer, chat template and generation config files of a model folder."""
    found: dict[str, Path] = {}
    for pattern in TOKENIZER_FILES:
        for f in sorted(Path(src).glob(pattern)):
            if f.is_file():
                found.setdefault(f.name, f)
    return list(found.values())


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and generation config, byte for byte (never re-serialised)."""
    files = tokenizer_files(src)
    for f in files:
        shutil.copyfile(f, Path(dst) / f.name)
    return [f.name for f in files]


def dense_weights(model_dir: Path, dtype, row_blocks: dict | None = None) -> tuple[dict, dict]:
    """Every parameter of an MLX model folder by its MLX name, dense and cast to `dtype`.

    Arrays stay lazy: each is read, dequantized and cast when it is written. `row_blocks`, when
    given, receives name -> f(start, stop): the same dequantized tensor's rows start:stop, lazily,
    so that a writer never holds a whole float32 dequantization.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(Path(model_dir), lazy=True)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise PipelineError(f"mlx-lm could not load {model_dir}: {e}. Re-run `make fuse`.") from None
    weights = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if "scales" in m:  # quantized layer: w = scale * q + bias per group
            rows = partial(_dequantized_rows, m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
            weights[f"{name}.weight"] = rows(None, None)
            if row_blocks is not None:
                row_blocks[f"{name}.weight"] = lambda start, stop, rows=rows: rows(start, stop).astype(dtype)
            del weights[f"{name}.scales"]
            weights.pop(f"{name}.biases", None)
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
            for k, v in weights.items()}, config


def _dequantized_rows(w, scales, biases, group_size: int, bits: int, mode: str, start, stop):
    """Rows start:stop of a quantized weight, dequantized in float32 (one rounding, at the cast)."""
    import mlx.core as mx

    def f32(a):
        return a[start:stop].astype(mx.float32) if a is not None else None

    return mx.dequantize(w[start:stop], f32(scales), f32(biases), group_size=group_size, bits=bits, mode=mode)


def hf_config(base_config: dict, dtype: str, tied: bool) -> tuple[dict, list[str]]:
    """The base's config.json with only what the export changes: dtype, no quantization keys."""
    config, changes = dict(base_config), []
    for key in ("quantization", "quantization_config"):
        if config.pop(key, None) is not None:
            changes.append(f"removed {key} (the weights are dense)")
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        if config.get(key) != dtype:
            changes.append(f"{key} = {dtype} (was {config.get(key)})")
            config[key] = dtype
    if tied and not config.get("tie_word_embeddings"):
        # mlx-lm built the model without lm_head (its default ties); say so, or transformers
        # would start from a random output layer.
        config["tie_word_embeddings"] = True
        changes.append("tie_word_embeddings = true (the MLX model has no separate lm_head)")
    return config, changes


def save_shards(weights: dict, out: Path, max_bytes: int, row_blocks: dict | None = None) -> list[str]:
    """Write safetensors of at most `max_bytes` each (a larger tensor gets a shard of its own),
    tensor by tensor. `weights` (and `row_blocks`) are consumed: each array is dropped once written,
    so the caller must hold no other reference to them, or they stay in memory."""
    shards, size = [[]], 0
    total = sum(v.nbytes for v in weights.values())
    for k in sorted(weights):
        n = weights[k].nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    count = len(shards)
    names = (["model.safetensors"] if count == 1
             else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
    weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
    for name, keys in zip(names, shards):
        write_safetensors(out / name, keys, weights, row_blocks or {})
    if count > 1:
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


BLOCK_BYTES = 64 << 20  # float32 rows dequantized at a time: bounds a writer's memory on any model size
_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "uint32": "U32",
           "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16", "bfloat16": "BF16",
           "float32": "F32", "float64": "F64"}


def write_safetensors(path: Path, keys: list[str], weights: dict, row_blocks: dict) -> None:
    """One safetensors file of `keys`, popped from `weights` as they are written; "format": "pt" is
    what transformers expects in the metadata."""
    import mlx.core as mx

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in keys:
        v = weights[k]
        header[k] = {"dtype": _DTYPES[str(v.dtype).rpartition(".")[2]], "shape": list(v.shape),
                     "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for k in keys:
            v, rows = weights.pop(k), row_blocks.pop(k, None)
            if rows is None or v.ndim == 0 or v.size * 4 <= BLOCK_BYTES:
                f.write(memoryview(mx.contiguous(v)))
            else:
                step = max(1, BLOCK_BYTES * v.shape[0] // (v.size * 4))
                for start in range(0, v.shape[0], step):
                    f.write(memoryview(mx.contiguous(rows(start, start + step))))
            del v, rows
            mx.clear_cache()  # MLX keeps freed buffers for reuse; an export never needs them again


def shared_files(model_dir: Path, dtype: str, config: dict, renames: bool, tied: bool,
                 max_bytes: int) -> tuple[list[Path], list[str]] | None:
    """(files, tensor names) of `model_dir` when the export would write exactly its tensors, unchanged:
    a dense folder (no quantization in `config`, its config.json) whose every tensor is already in
    `dtype`, under names the export keeps (`renames` False: the architecture's `to_hf_weights` is the
    identity; no lm_head.weight to drop when the export ties embeddings), no file above `max_bytes`.
    Then the export can link those files instead of writing the same bytes again; decided from the
    headers alone, so mlx-lm is not even imported. Only for a folder that 07 wrote from mlx-lm's own
    parameters (its names are mlx-lm's). None otherwise."""
    if renames or "quantization" in config or "quantization_config" in config:
        return None
    files = sorted(Path(model_dir).glob("*.safetensors"))
    names = []
    for f in files:
        if f.stat().st_size > max_bytes:
            return None
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        if any(v["dtype"] != _DTYPES[dtype] for v in header.values()):
            return None
        names += header
    if not files or (tied and "lm_head.weight" in names):
        return None
    return files, names


def link_shards(files: list[Path], out: Path, weight_map: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Hard-link `files` into `out` (a copy across file systems); an index when there are several.
    Returns the names and how ("hard-linked" or "copied"). Safe against a later rewrite of the
    source: every writer in the pipeline writes a new file and renames it, so the shared inode is
    never written again, and the source's next version gets a new one."""
    how = {link_or_copy(f, out / f.name) for f in files}
    if len(files) > 1:
        weight_map = weight_map or {}
        total = 0
        for f in files:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for k, v in header.items():
                if k != "__metadata__":
                    weight_map[k] = f.name
                    total += v["data_offsets"][1] - v["data_offsets"][0]
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return [f.name for f in files], "copied" if "copied" in how else "hard-linked"
