"""Mistral 7B / Nemo / Small: llama's weights and layers under another model_type. mlx-lm loads it
as llama and llama.cpp converts it as llama (a GGUF of it says `llama`). A `sliding_window` (only
Mistral-7B v0.1 sets one, 4096) is ignored by both, so beyond that many tokens they differ from
transformers; training and GGUF agree with each other."""

from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

ARCH = Arch(
    model_type="mistral",
    gguf_arch="llama",
    presets={"attention": ATTENTION, "mlp": MLP},
    normalise=flatten_rope_parameters,
)
