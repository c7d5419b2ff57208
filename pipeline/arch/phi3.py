"""Phi-3 / Phi-3.5-mini, Phi-4-mini: llama with the attention projections fused into one
`qkv_proj` (rows q | k | v) and the MLP's gate and up into one `gate_up_proj` (rows gate | up), in
the Hub checkpoint and in mlx-lm alike, so the presets name the fused layers and nothing is
renamed. head_dim is hidden_size / num_attention_heads; Phi-4-mini rotates only
`partial_rotary_factor` (0.75) of each head.

transformers 5 moves `rope_scaling` (with `type`), `partial_rotary_factor` and
`original_max_position_embeddings` into `rope_parameters`; mlx-lm reads them at the top level, needs
`type`, and silently drops a scaling type other than longrope/su/linear: such a config is refused.

Refused: longrope with `short_factor` != `long_factor` (Phi-3.5-mini, Phi-4-mini as published).
mlx-lm applies `long_factor` at every length, while transformers and llama.cpp apply `short_factor`
up to `original_max_position_embeddings` tokens (llama.cpp: for a context that size or smaller):
the GGUF would not compute the model that was trained. With long_factor set to short_factor all
three compute the published model's function up to that length (the fix the message gives)."""

from ..errors import PipelineError
from . import Arch, flatten_rope_parameters

_MLX_LM_SCALING = ("longrope", "su", "linear")
# Read by mlx-lm's phi3 from the top level only.
_TOP_LEVEL = ("partial_rotary_factor", "original_max_position_embeddings")


def normalise(cfg: dict) -> list[str]:
    rp = cfg.get("rope_parameters")
    changes = []
    if isinstance(rp, dict):
        for key in _TOP_LEVEL:
            if key in rp and cfg.get(key) != rp[key]:
                cfg[key] = rp[key]
                changes.append(f"{key} = {rp[key]} (from rope_parameters)")
        cfg["rope_parameters"] = {k: v for k, v in rp.items() if k not in _TOP_LEVEL}
    changes += flatten_rope_parameters(cfg)
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in _MLX_LM_SCALING:
            raise PipelineError(
                f"config.json: rope_scaling type {kind!r} is not one mlx-lm's phi3 applies "
                f"({', '.join(_MLX_LM_SCALING)}); it would silently train without it.")
        _refuse_two_factor_longrope(cfg, scaling)
        hub = {k: v for k, v in scaling.items() if k != "rope_type"} | {"type": kind}
        if hub != scaling:
            cfg["rope_scaling"] = hub
            changes.append(f"rope_scaling keys {sorted(hub)} (type {kind})")
    return changes


def _refuse_two_factor_longrope(cfg: dict, scaling: dict) -> None:
    short, long_ = scaling.get("short_factor"), scaling.get("long_factor")
    if short is None or long_ is None or short == long_:
        return
    original = cfg.get("original_max_position_embeddings", 4096)
    raise PipelineError(
        "config.json: rope_scaling has short_factor != long_factor (longrope). mlx-lm trains with long_factor "
        f"at every length, but transformers and llama.cpp use short_factor up to {original} tokens, so the "
        "exported model would not be the trained one. To fine-tune it as the model it is up to "
        f"{original} tokens (what llama.cpp runs at that context or less), copy rope_scaling.short_factor "
        "over rope_scaling.long_factor in config.json."
    )


ARCH = Arch(
    model_type="phi3",
    gguf_arch="phi3",
    presets={"attention": ["self_attn.qkv_proj", "self_attn.o_proj"], "mlp": ["mlp.gate_up_proj", "mlp.down_proj"]},
    normalise=normalise,
)
