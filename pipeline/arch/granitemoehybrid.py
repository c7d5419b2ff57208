"""Granite 4.0 H (Mamba2 + attention): layers are 'mamba' or 'attention' per `layer_types`;
a mamba layer has no self_attn, so the attention preset also adapts the mamba projections.
transformers 5 writes layer_types as linear_attention/full_attention, which mlx-lm rejects.
mlx-lm renames weights on load (`Model.sanitize`): the dense `shared_mlp.input_linear` is split into
`mlp.gate_proj`/`mlp.up_proj` and `shared_mlp.output_linear` becomes `mlp.down_proj` (MoE
checkpoints: `block_sparse_moe.input_linear`/`output_linear` -> `switch_mlp.*`), and conv1d weights
are stored (C, K, 1) instead of (C, 1, K); `to_hf_weights` undoes all three.
The MoE fields must agree before anything loads the model: transformers fills a missing
`num_local_experts` with 8 and `num_experts_per_tok` with 2 (also beside 0 experts) while mlx-lm
reads a missing count as dense, and llama.cpp aborts the whole process when experts used > experts.
Every layer "attention" (Granite 4.0 Micro) is converted by llama.cpp as `granite`."""

from ..errors import PipelineError
from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}
# Defaults transformers' GraniteMoeHybridConfig fills in for keys a config leaves out.
_TRANSFORMERS_DEFAULTS = {"num_local_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 1024}


def normalise(cfg: dict) -> list[str]:
    changes = flatten_rope_parameters(cfg)
    types = cfg.get("layer_types")
    if isinstance(types, list) and any(t in _LAYER_TYPES for t in types):
        cfg["layer_types"] = [_LAYER_TYPES.get(t, t) for t in types]
        changes.append("layer_types renamed to mamba/attention")
    _check_rope(cfg)
    return changes + _normalise_experts(cfg)


def _check_rope(cfg: dict) -> None:
    """llama.cpp's converter writes no RoPE for a model with mamba layers (Granite 4.0 H checkpoints
    say `nope`); mlx-lm and transformers apply it when the config says `rope`: refused, not exported wrong."""
    hybrid = "mamba" in (cfg.get("layer_types") or [])
    if hybrid and cfg.get("position_embedding_type", "rope") == "rope":  # mlx-lm's default is rope
        raise PipelineError(
            "config.json: position_embedding_type is 'rope' (or left out, which mlx-lm reads as rope) in a model "
            "with mamba layers: llama.cpp's converter drops RoPE for hybrid Granite models, so its GGUF would "
            "compute another function. Granite 4.0 H checkpoints say \"position_embedding_type\": \"nope\"; "
            "set that if this is one.")


def _normalise_experts(cfg: dict) -> list[str]:
    """Dense (0 experts) -> 0 used; anything else that is missing or contradictory is refused."""
    for key in ("num_local_experts", "shared_intermediate_size"):
        if cfg.get(key) is None:
            raise PipelineError(
                f"config.json has no `{key}`: transformers would assume {_TRANSFORMERS_DEFAULTS[key]}, which "
                "need not be this checkpoint's. Set it from the model card (Granite 4.0: num_local_experts 0 "
                "for Micro/H-Micro, 64 for H-Tiny; shared_intermediate_size as the checkpoint's shared_mlp).")
    experts, used = cfg["num_local_experts"], cfg.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 0:
        raise PipelineError(f"config.json: num_local_experts = {experts!r}; expected 0 (dense) or a positive count.")
    if experts == 0:
        if used != 0:
            cfg["num_experts_per_tok"] = 0
            was = "left out, transformers fills 2" if used is None else used
            return [f"num_experts_per_tok = 0 (was {was}; the model has no experts, and llama.cpp aborts when "
                    "more are used than exist)"]
        return []
    if used is None:
        raise PipelineError(
            f"config.json has num_local_experts = {experts} but no `num_experts_per_tok`: transformers would "
            f"assume {_TRANSFORMERS_DEFAULTS['num_experts_per_tok']}. Set it from the model card "
            "(Granite 4.0 H-Tiny: 6).")
    if not isinstance(used, int) or not 1 <= used <= experts:
        raise PipelineError(
            f"config.json: num_experts_per_tok = {used!r} with num_local_experts = {experts}: experts used per "
            f"token must be between 1 and {experts} (llama.cpp aborts otherwise). Fix num_experts_per_tok.")
    return []


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


def gguf_arch_of(cfg: dict) -> str:
    """llama.cpp's converter writes a model without mamba layers as granite (granitemoe with experts)."""
    if set(cfg.get("layer_types") or ["mamba"]) != {"attention"}:
        return "granitehybrid"
    return "granitemoe" if cfg.get("num_experts_per_tok") else "granite"


ARCH = Arch(
    model_type="granitemoehybrid",
    gguf_arch="granitehybrid",
    presets={
        "attention": ATTENTION + ["mamba.in_proj", "mamba.out_proj"],
        # Dense checkpoints' shared_mlp is loaded by mlx-lm as mlp.gate/up/down_proj; MoE ones keep
        # shared_mlp and hold the experts in SwitchLinear layers (mlx-lm's LoRASwitchLinear adapts them).
        "mlp": MLP + ["shared_mlp.input_linear", "shared_mlp.output_linear"]
        + [f"block_sparse_moe.switch_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")],
    },
    normalise=normalise,
    to_hf_weights=to_hf_weights,
    gguf_arch_of=gguf_arch_of,
    native_gguf=True,
)
