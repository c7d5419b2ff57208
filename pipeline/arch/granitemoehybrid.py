"""Granite 4.0 H (Mamba2 + attention): layers are 'mamba' or 'attention' per `layer_types`;
a mamba layer has no self_attn, so the attention preset also adapts the mamba projections.
transformers 5 writes layer_types as linear_attention/full_attention, which mlx-lm rejects.
mlx-lm renames weights on load (`Model.sanitize`): the dense `shared_mlp.input_linear` is split into
`mlp.gate_proj`/`mlp.up_proj` and `shared_mlp.output_linear` becomes `mlp.down_proj` (MoE
checkpoints: `block_sparse_moe.input_linear`/`output_linear` -> `switch_mlp.*`), and conv1d weights
are stored (C, K, 1) instead of (C, 1, K); `to_hf_weights` undoes all three."""

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


# (mlx-lm module, Hub module, axis joining gate|up): the dense MLP, the MoE experts.
_GLU = [("mlp", "shared_mlp", 0), ("block_sparse_moe.switch_mlp", "block_sparse_moe", 1)]


def to_hf_weights(weights: dict, config: dict) -> dict:
    import mlx.core as mx

    out = {}
    for k, v in weights.items():
        if k.endswith("conv1d.weight") and v.ndim == 3 and v.shape[-1] == 1:
            v = v.swapaxes(1, 2)  # MLX conv weights are (C, K, 1), torch's (C, 1, K)
        for mlx_mod, hf_mod, axis in _GLU:
            if f".{mlx_mod}.up_proj." in k:
                break  # joined with gate_proj below
            if f".{mlx_mod}.gate_proj." in k:
                up = weights[k.replace(".gate_proj.", ".up_proj.")]
                out[k.replace(f"{mlx_mod}.gate_proj", f"{hf_mod}.input_linear")] = mx.concatenate([v, up], axis)
                break
            if f".{mlx_mod}.down_proj." in k:
                out[k.replace(f"{mlx_mod}.down_proj", f"{hf_mod}.output_linear")] = v
                break
        else:
            out[k] = v
    return out


ARCH = Arch(
    model_type="granitemoehybrid",
    gguf_arch="granitehybrid",
    presets={
        "attention": ATTENTION + ["mamba.in_proj", "mamba.out_proj"],
        # Dense checkpoints' shared_mlp is loaded by mlx-lm as mlp.gate/up/down_proj.
        "mlp": MLP + ["shared_mlp.input_linear", "shared_mlp.output_linear"],
    },
    normalise=normalise,
    to_hf_weights=to_hf_weights,
)
