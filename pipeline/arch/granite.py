"""Granite 3.x / 4.0 dense: llama plus embedding/residual/attention/logits multipliers (read by
mlx-lm from config.json). mlx-lm requires a top-level `rope_theta`."""

from . import Arch, flatten_rope_parameters
from .llama import ATTENTION, MLP

ARCH = Arch(
    model_type="granite",
    gguf_arch="granite",
    presets={"attention": ATTENTION, "mlp": MLP},
    normalise=flatten_rope_parameters,
    native_gguf=True,
)
