"""Qwen3 (dense): llama with RMS norms on each head's queries and keys (`q_norm`, `k_norm`) and a
`head_dim` that need not be hidden_size / num_attention_heads (Qwen3-0.6B: 1024 wide, 16 heads of
128)."""

from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

ARCH = Arch(
    model_type="qwen3",
    gguf_arch="qwen3",
    presets={"attention": ATTENTION, "mlp": MLP},
    normalise=flatten_rope_parameters,
)
