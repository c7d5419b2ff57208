"""08 Convert the fused MLX model to a Hugging Face folder that transformers (and llama.cpp's
converter) load.

Weights: dense safetensors in `export.dtype`. MLX quantized layers are dequantized
(w = scale * q + bias, in float32, rounded once to the export dtype) and the architecture's
`to_hf_weights` undoes mlx-lm's load-time renames; sharded above `export.max_shard_gb` with a
`model.safetensors.index.json`. config.json is the base model's own (Hub form: top-level
rope_theta, granitemoehybrid layer types mamba/attention) with only what changed edited:
transformers 5 loads that form, while its save_pretrained would rewrite it into one mlx-lm
rejects (PLATFORM_NOTES). Tokenizer files and generation_config.json are copied byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from .. import arch
from ..errors import PipelineError
from ..fsio import atomic_path, dir_size, hash_model_dir, human_size, write_json
from ..manifest import MANIFEST, read_manifest, write_manifest
from ..modeling import check_weight_files, read_config
from ..paths import GivenPaths, RunPaths, check_given_output, require_folder
from .common import done, start_phase
from .p07_fuse_lora import copy_tokenizer_files

INDEX = "model.safetensors.index.json"


@dataclass
class HFResult:
    path: Path
    dtype: str
    shards: list[str]
    size_bytes: int
    config_changes: list[str]


def convert_to_hf(cfg, paths: RunPaths | None = None) -> HFResult:
    import mlx.core as mx

    given = isinstance(paths, GivenPaths)  # the guides' form: --mlx-model DIR --output-dir DIR
    started = start_phase(cfg, "08 convert to Hugging Face", ["export"], given=paths.given if given else None)
    paths = paths or RunPaths(cfg)
    if given:
        # A folder from elsewhere (`mlx_lm fuse`) has no manifest: its own config.json is the base's
        # (mlx-lm keeps the Hub form and adds `quantization`, which hf_config removes).
        require_folder(paths.fused, "--mlx-model")
        check_given_output(paths.hf, {"the MLX model": paths.fused}, "08_convert_to_hf")
        fused_manifest = read_manifest(paths.fused, "fuse") if (paths.fused / MANIFEST).is_file() else {}
        check_weight_files(paths.fused)
        config_dir = paths.fused
    else:
        fused_manifest = read_manifest(paths.fused, "fuse")
        read_manifest(paths.base, "base")
        config_dir = paths.base
    base_config = read_config(config_dir)

    weights, mlx_config = dense_weights(paths.fused, getattr(mx, cfg.export.dtype))
    model_type = mlx_config["model_type"]
    if base_config.get("model_type") != model_type:
        raise PipelineError(
            f"{paths.fused} is a {model_type} model but {paths.base}/config.json says "
            f"{base_config.get('model_type')}. Re-run `make fuse` for this run (or 07 on the right base)."
        )
    weights = arch.get(model_type).to_hf_weights(weights, mlx_config)
    config, changes = hf_config(base_config, cfg.export.dtype, tied="lm_head.weight" not in weights)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)  # tied: transformers reuses embed_tokens

    out = paths.hf
    expected = sum(v.nbytes for v in weights.values())
    with atomic_path(out, expected_bytes=expected, what=f"the Hugging Face export ({cfg.export.dtype})") as tmp:
        tmp.mkdir()
        shards = save_shards(weights, tmp, int(cfg.export.max_shard_gb * 1e9))
        write_json(tmp / "config.json", config)
        copied = copy_tokenizer_files(config_dir, tmp)
        if "generation_config.json" not in copied:
            ids = ("bos_token_id", "eos_token_id", "pad_token_id")
            write_json(tmp / "generation_config.json", {k: config[k] for k in ids if k in config})
        size = dir_size(tmp, "*.safetensors")
        write_manifest(
            tmp, "08_convert_to_hf", cfg, started,
            inputs={
                "fused": {"path": str(paths.fused),
                          "content_hash": fused_manifest.get("outputs", {}).get("content_hash") or hash_model_dir(paths.fused),
                          "dequantized": fused_manifest.get("dequantized")},
                "config": str(config_dir / "config.json"),
            },
            outputs={"path": str(out), "content_hash": hash_model_dir(tmp), "shards": shards, "size_bytes": size,
                     "tensors": len(weights)},
            config_changes=changes,
            copied=copied,
        )
    click.echo(f"wrote {len(weights)} tensors in {len(shards)} shard(s), {human_size(size)} ({cfg.export.dtype})")
    for c in changes:
        click.echo(f"config.json: {c}")
    done(f"Hugging Face model ready: {out}")
    return HFResult(out, cfg.export.dtype, shards, size, changes)


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
    names = ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for name, keys in zip(names, shards):
        # "format": "pt" is what transformers expects in safetensors metadata.
        mx.save_safetensors(str(out / name), {k: weights[k] for k in keys}, metadata={"format": "pt"})
    if count > 1:
        write_json(out / INDEX, {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
        })
    return names
