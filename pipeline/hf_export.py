"""An MLX model folder as a Hugging Face folder: dense weights by name, the config without its
quantization, safetensors shards, the tokenizer files copied byte for byte. Phases 07 and 08 and
the LoRA GGUF's base (pipeline/adapter_gguf.py) share it."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import PipelineError
from .fsio import write_json

INDEX = "model.safetensors.index.json"
# What a model folder carries besides weights and config.json; copied byte for byte.
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "*.tiktoken", "chat_template*", "generation_config.json"]


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and generation config, byte for byte (never re-serialised)."""
    copied = []
    for pattern in TOKENIZER_FILES:
        for f in sorted(Path(src).glob(pattern)):
            if f.is_file() and f.name not in copied:
                shutil.copyfile(f, Path(dst) / f.name)
                copied.append(f.name)
    return copied


def dense_weights(model_dir: Path, dtype) -> tuple[dict, dict]:
    """Every parameter of an MLX model folder by its MLX name, dense and cast to `dtype`.

    Arrays stay lazy: each is read, dequantized and cast when its shard is written.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    def f32(a):
        return a.astype(mx.float32) if a is not None and mx.issubdtype(a.dtype, mx.floating) else a

    try:
        model, config = load_model(Path(model_dir), lazy=True)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise PipelineError(f"mlx-lm could not load {model_dir}: {e}. Re-run `make fuse`.") from None
    weights = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if "scales" in m:  # quantized layer: w = scale * q + bias per group
            weights[f"{name}.weight"] = mx.dequantize(
                m.weight, f32(m.scales), f32(m.get("biases")), group_size=m.group_size, bits=m.bits, mode=m.mode
            )
            del weights[f"{name}.scales"]
            weights.pop(f"{name}.biases", None)
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}, config


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


def save_shards(weights: dict, out: Path, max_bytes: int) -> list[str]:
    """Write safetensors of at most `max_bytes` each (a larger tensor gets a shard of its own)."""
    import mlx.core as mx

    shards, size = [[]], 0
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
    for name, keys in zip(names, shards):
        # "format": "pt" is what transformers expects in safetensors metadata.
        mx.save_safetensors(str(out / name), {k: weights[k] for k in keys}, metadata={"format": "pt"})
    if count > 1:
        write_json(out / INDEX, {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
        })
    return names
