"""Gemma 3 text models (gemma-3-1b-it, gemma-3-270m; model_type gemma3_text): llama's projection
names, plus q/k norms, norms after attention and MLP, gelu-tanh, embeddings scaled by
sqrt(hidden_size), norm weights applied as 1 + w, and sliding-window attention on five layers of
every six (the sixth global, with its own RoPE base `rope_theta`; sliding layers use
`rope_local_base_freq`).

transformers 5 writes `rope_parameters` per attention kind ({full_attention: ..., sliding_attention:
...}) and `layer_types` instead of `rope_theta`, `rope_local_base_freq` and `sliding_window_pattern`,
which are what mlx-lm reads. Refused, because one of the tools would compute another function:
softcapping (mlx-lm ignores `final_logit_softcapping`, llama.cpp asserts `attn_logit_softcapping` is
unset), a pattern other than llama.cpp's fixed six, fewer layers than one pattern (mlx-lm indexes
the global layer), and a `query_pre_attn_scalar` other than the one llama.cpp derives."""

from ..errors import PipelineError
from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

# llama.cpp's gemma3 reads no pattern from the GGUF (its converter writes none) and assumes this one.
LLAMACPP_PATTERN = 6
# llama.cpp scales attention by 1/sqrt(hidden_size / heads) for this layer count (Gemma 3 27B), else 1/sqrt(head_dim).
_LAYERS_27B = 62


def _unnest_rope(cfg: dict) -> list[str]:
    rp = cfg.get("rope_parameters")
    if not (isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp)):
        return flatten_rope_parameters(cfg)
    changes = []
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    for key, src in (("rope_theta", full), ("rope_local_base_freq", local)):
        if "rope_theta" in src and cfg.get(key) != src["rope_theta"]:
            cfg[key] = src["rope_theta"]
            changes.append(f"{key} = {src['rope_theta']} (from rope_parameters)")
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = scaling
        changes.append(f"rope_scaling = {scaling} (from rope_parameters.full_attention)")
    del cfg["rope_parameters"]
    return changes + ["removed rope_parameters"]


def _pattern_of(types: list) -> int | None:
    """n when layer i is global exactly when (i + 1) % n == 0, as mlx-lm and llama.cpp lay it out."""
    globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
    if not globals_:
        return None
    n = globals_[0] + 1
    expected = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(len(types))]
    return n if types == expected else None


def _normalise_layers(cfg: dict) -> list[str]:
    types = cfg.get("layer_types")
    if not isinstance(types, list) or cfg.get("sliding_window_pattern") is not None:
        return []
    n = _pattern_of(types)
    if n is None:
        raise PipelineError(
            f"config.json: layer_types {types} is not a repeating run of sliding layers followed by one "
            "full_attention layer, the only layout mlx-lm's and llama.cpp's gemma3 implement.")
    cfg["sliding_window_pattern"] = n
    return [f"sliding_window_pattern = {n} (from layer_types)"]


def _refuse_what_a_tool_would_compute_differently(cfg: dict) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise PipelineError(
                f"config.json: {key} = {cfg[key]}: Gemma 3 has none, and mlx-lm ignores it (llama.cpp would "
                f"apply it), so training and the GGUF would differ. Set {key} to null if this is a Gemma 3 model.")
    pattern = cfg.get("sliding_window_pattern", LLAMACPP_PATTERN)
    if pattern != LLAMACPP_PATTERN:
        raise PipelineError(
            f"config.json: sliding_window_pattern = {pattern}: llama.cpp's gemma3 assumes every "
            f"{LLAMACPP_PATTERN}th layer is global, so its GGUF would compute another model. Only Gemma 3's "
            f"own layout ({LLAMACPP_PATTERN}) is supported.")
    layers = cfg.get("num_hidden_layers", 0)
    if layers < pattern:
        raise PipelineError(
            f"config.json: num_hidden_layers = {layers} is fewer than one sliding-window pattern ({pattern}): "
            "mlx-lm's gemma3_text needs at least one global layer.")
    heads, hidden, head_dim = cfg.get("num_attention_heads"), cfg.get("hidden_size"), cfg.get("head_dim")
    if None not in (heads, hidden, head_dim) and "query_pre_attn_scalar" in cfg:
        expected = hidden / heads if layers == _LAYERS_27B else head_dim
        if cfg["query_pre_attn_scalar"] != expected:
            raise PipelineError(
                f"config.json: query_pre_attn_scalar = {cfg['query_pre_attn_scalar']} but llama.cpp scales "
                f"attention by 1/sqrt({expected:g}) for this shape: a GGUF would differ from the trained model.")


def normalise(cfg: dict) -> list[str]:
    changes = _unnest_rope(cfg) + _normalise_layers(cfg)
    _refuse_what_a_tool_would_compute_differently(cfg)
    return changes


ARCH = Arch(
    model_type="gemma3_text",
    gguf_arch="gemma3",
    presets={"attention": ATTENTION, "mlp": MLP},
    normalise=normalise,
)
