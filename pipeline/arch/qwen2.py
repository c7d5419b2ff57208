"""Qwen2 / Qwen2.5: llama with biases on q_proj, k_proj and v_proj, and head_dim always
hidden_size / num_attention_heads (mlx-lm ignores a `head_dim` key). `use_sliding_window` is
false in every released checkpoint; mlx-lm and llama.cpp have no sliding window for qwen2."""

from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

ARCH = Arch(
    model_type="qwen2",
    gguf_arch="qwen2",
    presets={"attention": ATTENTION, "mlp": MLP},
    normalise=flatten_rope_parameters,
)
