"""Training layers for GPU backends: QLoRA at bf16 matmul speed, LoRA products in bf16.

MLX's 4-bit `quantized_matmul` runs at 95-133 TFLOP/s on an H200 at LoRA-training shapes, against
250-690 for bf16 matmuls (PLATFORM_NOTES). `DequantizedMatmulLinear` keeps the packed weights and
computes `x @ dequantize(W).T` with the bf16 matmul instead. A plain autodiff of that would keep
every layer's dequantized W alive from the forward to the backward pass (the whole model in bf16
on top of its packed form); the custom VJP rebuilds W from the packed form in the backward pass,
so at most a layer or two of dequantized weights exist at a time. The frozen weights get no
gradient (zeros, never evaluated: value_and_grad asks only for the adapters').

Same parameters and names as nn.QuantizedLinear (it is one), so adapters, checkpoints and fuse
see no difference. The CPU backend uses modeling.dequantize_layers (float32 dense layers) instead.

`ComputeDtypeLoRALinear`: mlx-lm's LoRA layer multiplies bf16 inputs by its float32 adapter, which
promotes each adapted projection's input to float32 and keeps that copy for the backward pass
(~3.8 GB at 4 x 1024 tokens on a 1 B model with all 7 projections adapted) and runs float32
matmuls. Here the adapter is cast to the input's dtype inside the product: the parameters, Adam's
state and updates stay float32, as in mixed-precision training.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear


@cache
def _dequantized_matmul(group_size: int, bits: int, mode: str):
    """`f(x, w, scales, biases) = x @ dequantize(w).T` with a backward pass that re-dequantizes."""

    def weight(w, scales, biases, dtype):
        return mx.dequantize(w, scales, biases, group_size, bits, mode=mode, dtype=dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ weight(w, scales, biases, x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # The backward copy of W depends on the cotangent: mx.compile cannot merge it with the
        # forward copy (which would keep that one alive), and it is only built when it is needed.
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])
        dx = cotangent @ weight(w, scales, biases, cotangent.dtype)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


class DequantizedMatmulLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose product runs as dequantize + bf16 matmul (see the module docstring)."""

    @classmethod
    def from_quantized(cls, q: nn.QuantizedLinear) -> DequantizedMatmulLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = q.group_size, q.bits, q.mode
        for key, value in q.items():  # weight, scales, biases (None for modes without), bias
            layer[key] = value
        layer.freeze()
        return layer

    def __call__(self, x):
        f = _dequantized_matmul(self.group_size, self.bits, self.mode)
        y = f(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y


def use_dequantized_matmul(model: nn.Module) -> int:
    """Swap every affine nn.QuantizedLinear (also those inside LoRA layers) for the dequantized-matmul
    one, keeping their trainable/frozen state. Returns the number swapped."""
    swaps = [(name, DequantizedMatmulLinear.from_quantized(m)) for name, m in model.named_modules()
             if type(m) is nn.QuantizedLinear and m.mode == "affine" and m.get("biases") is not None]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


class ComputeDtypeLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear with the low-rank product in the input's dtype (see the module docstring)."""

    @classmethod
    def from_lora(cls, lora: LoRALinear) -> ComputeDtypeLoRALinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.linear, layer.dropout, layer.scale = lora.linear, lora.dropout, lora.scale
        layer.lora_a, layer.lora_b = lora.lora_a, lora.lora_b
        return layer

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)


def use_compute_dtype_lora(model: nn.Module) -> int:
    """Swap every mlx-lm LoRALinear (not DoRA) for ComputeDtypeLoRALinear. Returns the number swapped."""
    swaps = [(name, ComputeDtypeLoRALinear.from_lora(m)) for name, m in model.named_modules() if type(m) is LoRALinear]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
