"""Architecture registry keyed by the config's `model_type`.

Each module describes only how its architecture differs: LoRA target presets, how a config
must be normalised so that mlx-lm reads it correctly, and how to undo the weight renames of
mlx-lm's `Model.sanitize` when exporting to Hugging Face (phase 08). To add an architecture:
CONTRIBUTING.md, "Adding an architecture".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import PipelineError

# llama first: mistral's GGUFs say `llama` too, and a GGUF imported at 02 is loaded as llama.
_MODULES = ["llama", "granite", "granitemoehybrid", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]

# model_types people meet that are refused on purpose, with what to use instead.
_REFUSED = {
    "gemma3": "Gemma 3 4B/12B/27B checkpoints are image-text models (model_type gemma3, "
    "Gemma3ForConditionalGeneration); only text-only Gemma 3 (model_type gemma3_text, e.g. google/gemma-3-1b-it "
    "or gemma-3-270m-it) is supported.",
}


@dataclass(frozen=True)
class Arch:
    model_type: str
    # The name llama.cpp uses in a GGUF's general.architecture.
    gguf_arch: str
    # LoRA presets -> module names relative to one decoder layer (mlx-lm's `keys`).
    presets: dict[str, list[str]]
    # Rewrites a config dict in place into the form mlx-lm (and the Hub checkpoints) use.
    normalise: Callable[[dict], list[str]] = field(default=lambda cfg: [])
    # (MLX weights, config) -> weights named and shaped as the Hugging Face checkpoint: the
    # inverse of mlx-lm's `Model.sanitize`. Identity for architectures it doesn't rename.
    to_hf_weights: Callable[[dict, dict], dict] = field(default=lambda weights, config: weights)
    notes: str = ""
    # The GGUF architecture of one config when it is not always `gguf_arch` (granitemoehybrid with
    # attention layers only is converted by llama.cpp as granite).
    gguf_arch_of: Callable[[dict], str] | None = None
    # Whether MLX's 4/5-bit weights can be transcoded into native Q4_1/Q5_1 GGUF blocks
    # (pipeline/gguf_native.py): needs gguf-py's tensor name map to cover every quantized layer.
    native_gguf: bool = False


def gguf_arch_of(config: dict) -> str:
    """The general.architecture llama.cpp's converter writes for this (normalised) config."""
    a = get(config["model_type"])
    return a.gguf_arch_of(config) if a.gguf_arch_of else a.gguf_arch


def supported() -> list[str]:
    return list(_MODULES)


def from_gguf_arch(name: str) -> Arch:
    for m in _MODULES:
        if get(m).gguf_arch == name:
            return get(m)
    known = ", ".join(dict.fromkeys(get(m).gguf_arch for m in _MODULES))
    raise PipelineError(f"GGUF architecture '{name}' is not supported. Supported: {known}.")


def get(model_type: str, architectures: list | None = None) -> Arch:
    if model_type not in _MODULES:
        raise unsupported(model_type, architectures)
    return importlib.import_module(f"{__name__}.{model_type}").ARCH


def unsupported(model_type, architectures: list | None = None) -> PipelineError:
    """The error for a model this pipeline cannot train, in the names of the model's own config.json."""
    names = f" ({', '.join(map(str, architectures))})" if architectures else ""
    why = _REFUSED.get(model_type, "")
    return PipelineError(
        f"Unsupported architecture: model_type '{model_type}'{names}. {why + ' ' if why else ''}"
        f"Supported model types: {', '.join(_MODULES)}. To add one (a module listing how it differs from llama, "
        "and a tiny test config), see \"Adding an architecture\" in CONTRIBUTING.md."
    )


def flatten_rope_parameters(cfg: dict) -> list[str]:
    """transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`; mlx-lm's llama and
    granite read only a top-level `rope_theta` (llama silently falls back to 10000)."""
    changes = []
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp and cfg.get("rope_theta") != rp["rope_theta"]:
            cfg["rope_theta"] = rp["rope_theta"]
            changes.append(f"rope_theta = {rp['rope_theta']} (from rope_parameters)")
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = scaling
            changes.append(f"rope_scaling = {scaling} (from rope_parameters)")
        del cfg["rope_parameters"]
        changes.append("removed rope_parameters")
    return changes


def normalise_config(cfg: dict) -> list[str]:
    """Normalise a config in place; returns a human-readable list of what changed."""
    if "model_type" not in cfg:
        raise PipelineError("config.json has no 'model_type'; is this a Hugging Face causal LM folder?")
    arch = get(cfg["model_type"], cfg.get("architectures"))
    changes = arch.normalise(cfg)
    if "torch_dtype" not in cfg and "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return changes


def resolve_targets(model_type: str, targets: list[str]) -> list[str]:
    """Turn presets ('attention', 'mlp', 'lm_head') and explicit names into mlx-lm LoRA keys."""
    arch = get(model_type)
    keys: list[str] = []
    for t in targets:
        if t == "lm_head":
            keys.append("lm_head")
        elif t in arch.presets:
            keys += arch.presets[t]
        elif "." in t or t.endswith("_proj"):
            keys.append(t)
        else:
            raise PipelineError(
                f"Unknown LoRA target '{t}' for {model_type}. Use presets "
                f"{', '.join(list(arch.presets) + ['lm_head'])} or module names such as "
                f"{arch.presets['attention'][0]}."
            )
    return list(dict.fromkeys(keys))
