"""Granite 4.0 H (Mamba2 + attention): layers are 'mamba' or 'attention' per `layer_types`;
a mamba layer has no self_attn, so the attention preset also adapts the mamba projections.
transformers 5 writes layer_types as linear_attention/full_attention, which mlx-lm rejects."""

from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}


def normalise(cfg: dict) -> list[str]:
    changes = flatten_rope_parameters(cfg)
    types = cfg.get("layer_types")
    if isinstance(types, list) and any(t in _LAYER_TYPES for t in types):
        cfg["layer_types"] = [_LAYER_TYPES.get(t, t) for t in types]
        changes.append("layer_types renamed to mamba/attention")
    return changes


ARCH = Arch(
    model_type="granitemoehybrid",
    gguf_arch="granitehybrid",
    presets={
        "attention": ATTENTION + ["mamba.in_proj", "mamba.out_proj"],
        # Dense checkpoints' shared_mlp is loaded by mlx-lm as mlp.gate/up/down_proj.
        "mlp": MLP + ["shared_mlp.input_linear", "shared_mlp.output_linear"],
    },
    normalise=normalise,
)
