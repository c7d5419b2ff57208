"""08 Convert the fused MLX model to a Hugging Face folder that transformers (and llama.cpp's
converter) load.

Weights: dense safetensors in `export.dtype`. MLX quantized layers are dequantized
(w = scale * q + bias, in float32, rounded once to the export dtype) and the architecture's
`to_hf_weights` undoes mlx-lm's load-time renames; sharded above `export.max_shard_gb` with a
`model.safetensors.index.json`. config.json is the base model's own (Hub form: top-level
rope_theta, granitemoehybrid layer types mamba/attention) with only what changed edited:
transformers 5 loads that form, while its save_pretrained would rewrite it into one mlx-lm
rejects (PLATFORM_NOTES). Tokenizer files and generation_config.json are copied byte for byte.

Memory: tensor by tensor (pipeline/hf_export.py). Disk: when fused/ already holds exactly the
export's tensors (a de-quantized fuse in the export dtype), its safetensors are hard-linked, not
copied; 07 replaces fused/ by rename, so a re-fuse never changes the files hf/ shares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from .. import arch
from ..errors import PipelineError
from ..fsio import atomic_path, dir_size, hash_model_dir, human_size, same_inode_hashes, write_json
from ..hf_export import (  # noqa: F401 (tests: INDEX)
    INDEX,
    copy_tokenizer_files,
    dense_weights,
    hf_config,
    link_shards,
    save_shards,
    shared_files,
    tokenizer_files,
)
from ..manifest import MANIFEST, read_manifest, write_manifest
from ..modeling import check_weight_files, read_config
from ..paths import GivenPaths, RunPaths, check_given_output, require_folder
from .common import done, start_phase


@dataclass
class HFResult:
    path: Path
    dtype: str
    shards: list[str]
    size_bytes: int
    config_changes: list[str]
    finish: Callable[[], None] = lambda: None  # writes a deferred manifest (convert_to_hf's doc)


def convert_to_hf(cfg, paths: RunPaths | None = None, defer_manifest: bool = False) -> HFResult:
    """`defer_manifest` (09, which converts hf/ next): when the shards are fused/'s own files (hard
    links), hf/ is put in place without its manifest, its content hash is computed in a thread while
    the caller works (llama.cpp's converter reads the same pages), and `HFResult.finish()` writes the
    manifest. Until then hf/ counts as incomplete, as after a crash: the next run makes it again."""
    given = isinstance(paths, GivenPaths)  # the guides' form: --mlx-model DIR --output-dir DIR
    started = start_phase(cfg, "08 convert to Hugging Face", ["export"], given=paths.given if given else None)
    paths = paths or RunPaths(cfg)
    if given:
        # A folder from elsewhere (`mlx_lm fuse`) has no manifest: its own config.json is the base's
        # (mlx-lm keeps the Hub form and adds `quantization`, which hf_config removes).
        require_folder(paths.fused, "--mlx-model")
        check_given_output(paths.hf, {"the MLX model": paths.fused}, "08_convert_to_hf")
        fused_manifest = read_manifest(paths.fused, "fuse") if (paths.fused / MANIFEST).is_file() else {}
        config_dir = paths.fused
    else:
        fused_manifest = read_manifest(paths.fused, "fuse")
        read_manifest(paths.base, "base")
        config_dir = paths.base
    check_weight_files(paths.fused)  # every safetensors header validated before MLX reads the weights
    base_config = read_config(config_dir)

    mlx_folder = read_config(paths.fused)
    model_type = mlx_folder.get("model_type")
    if base_config.get("model_type") != model_type:
        raise PipelineError(
            f"{paths.fused} is a {model_type} model but {paths.base}/config.json says "
            f"{base_config.get('model_type')}. Re-run `make fuse` for this run (or 07 on the right base)."
        )
    architecture = arch.get(model_type)
    max_bytes = int(cfg.export.max_shard_gb * 1e9)
    # A de-quantized fuse in the export dtype holds these very tensors: link its files, not a copy.
    # Only in a run folder, whose writers replace files by rename: a folder of the user's may be
    # rewritten in place (mlx_lm fuse does), which would change the export through the shared file.
    renames = architecture.to_hf_weights is not arch.Arch.__dataclass_fields__["to_hf_weights"].default
    shared = None if given else shared_files(paths.fused, cfg.export.dtype, mlx_folder, renames,
                                             bool(base_config.get("tie_word_embeddings")), max_bytes)
    if shared:
        weights, row_blocks, (shared, names) = {}, {}, shared
        n_tensors, tied = len(names), "lm_head.weight" not in names
    else:
        import mlx.core as mx  # only here: linking the shards needs no MLX

        row_blocks = {}  # dequantized tensors are written a block of rows at a time
        weights, mlx_config = dense_weights(paths.fused, getattr(mx, cfg.export.dtype), row_blocks)
        weights = architecture.to_hf_weights(weights, mlx_config)
        n_tensors, tied = len(weights), "lm_head.weight" not in weights
    config, changes = hf_config(base_config, cfg.export.dtype, tied=tied)
    if config.get("tie_word_embeddings") and weights.pop("lm_head.weight", None) is not None:
        n_tensors -= 1  # tied: transformers reuses embed_tokens

    out = paths.hf
    expected = sum(f.stat().st_size for f in tokenizer_files(config_dir)) + (
        0 if shared else sum(v.nbytes for v in weights.values()))
    with atomic_path(out, expected_bytes=expected, what=f"the Hugging Face export ({cfg.export.dtype})") as tmp:
        tmp.mkdir()
        if shared:
            shards, how = link_shards(shared, tmp)
        else:
            shards, how = save_shards(weights, tmp, max_bytes, row_blocks), "written"
        write_json(tmp / "config.json", config)
        copied = copy_tokenizer_files(config_dir, tmp)
        if "generation_config.json" not in copied:
            ids = ("bos_token_id", "eos_token_id", "pad_token_id")
            write_json(tmp / "generation_config.json", {k: config[k] for k in ids if k in config})
        size = dir_size(tmp, "*.safetensors")
        fused_hash = fused_manifest.get("outputs", {}).get("content_hash") or hash_model_dir(paths.fused)

        def manifest(folder: Path, content_hash: str) -> None:
            write_manifest(
                folder, "08_convert_to_hf", cfg, started,
                inputs={
                    "fused": {"path": str(paths.fused), "content_hash": fused_hash,
                              "dequantized": fused_manifest.get("dequantized")},
                    "config": str(config_dir / "config.json"),
                },
                outputs={"path": str(out), "content_hash": content_hash, "shards": shards, "size_bytes": size,
                         "tensors": n_tensors, "shards_from_fused": how if shared else None},
                config_changes=changes,
                copied=copied,
            )

        # Shards hard-linked from fused/ are the very files 07 hashed while writing them.
        fused_hashes = fused_manifest.get("outputs", {}).get("file_sha256") or {}
        deferred = bool(shared) and defer_manifest
        if not deferred:
            manifest(tmp, hash_model_dir(tmp, same_inode_hashes(tmp, paths.fused, fused_hashes)))
    finish = _hashed_later(out, manifest, same_inode_hashes(out, paths.fused, fused_hashes)) if deferred else (
        lambda: None)
    if shared:
        click.echo(f"{n_tensors} tensors in {len(shards)} shard(s), {human_size(size)} ({cfg.export.dtype}): "
                   f"{how} from {paths.fused} (the same tensors, so no second copy on disk)")
    else:
        click.echo(f"wrote {n_tensors} tensors in {len(shards)} shard(s), {human_size(size)} ({cfg.export.dtype})")
    for c in changes:
        click.echo(f"config.json: {c}")
    done(f"Hugging Face model ready: {out}")
    return HFResult(out, cfg.export.dtype, shards, size, changes, finish)


def _hashed_later(folder: Path, manifest: Callable[[Path, str], None], known: dict[str, str]) -> Callable[[], None]:
    """Start hashing `folder` in a thread (hashlib releases the GIL, so it runs beside the caller's
    next step); the returned call waits for the hash and writes the manifest with it. `known`: the
    files' sha256s already taken (fsio.hash_model_dir)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="hf-hash")
    job = pool.submit(hash_model_dir, folder, known)
    pool.shutdown(wait=False)
    return lambda: manifest(folder, job.result())
