"""Llama 2/3.x, SmolLM2: the reference decoder; every other architecture lists its differences."""

from . import Arch, flatten_rope_parameters

ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

ARCH = Arch(
    model_type="llama",
    gguf_arch="llama",
    presets={"attention": ATTENTION, "mlp": MLP},
    normalise=flatten_rope_parameters,
    native_gguf=True,
)
