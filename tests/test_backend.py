"""MLX backend choice (make setup, the pyproject extras), the phase banner, and the GPU training layers.

The GPU layers (pipeline/qlora.py) are checked here on the CPU in float32 against what they
replace: nn.QuantizedLinear and mlx-lm's LoRALinear. nvidia-smi is faked by a script on PATH:
it is not our code under test, only the signal the Makefile and the banner read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from pipeline import runtime
from pipeline.qlora import (
    ComputeDtypeLoRALinear,
    DequantizedMatmulLinear,
    use_compute_dtype_lora,
    use_dequantized_matmul,
)

ROOT = Path(__file__).resolve().parent.parent


def fake_nvidia_smi(folder: Path, cuda_version: str = "13.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -L ]; then echo "GPU 0: NVIDIA H200 (UUID: GPU-0000)"; exit 0; fi\n'
        f'echo "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: {cuda_version} |"\n'
    )
    script.chmod(0o755)
    return folder


@pytest.fixture
def gpu_path(tmp_path, monkeypatch):
    """PATH with a fake nvidia-smi listing one H200 first."""
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    runtime.visible_nvidia_gpus.cache_clear()
    yield
    runtime.visible_nvidia_gpus.cache_clear()


# --- banner ------------------------------------------------------------------------------------


def test_banner_names_device_and_dtype_without_warning_when_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    runtime.visible_nvidia_gpus.cache_clear()
    line, warning = runtime.device_banner()
    assert line.startswith("device: cpu") and line.endswith("compute dtype: float32")
    assert warning is None
    runtime.visible_nvidia_gpus.cache_clear()


def test_banner_warns_when_a_gpu_is_visible_but_mlx_runs_on_cpu(gpu_path):
    assert runtime.visible_nvidia_gpus() == ("NVIDIA H200",)
    line, warning = runtime.device_banner("bfloat16")
    assert line.startswith("device: cpu") and "compute dtype: bfloat16" in line
    assert "NVIDIA H200" in warning and "MLX runs on the CPU" in warning
    assert "make setup BACKEND=cuda" in warning and "mlx-pipeline[cuda]" in warning


def test_every_phase_prints_the_banner(gpu_path, tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.phases.common import start_phase

    cfg = load_config(cli={"run": "banner", "models_dir": str(tmp_path)}, env={})
    start_phase(cfg, "01 prepare data", ["data"])
    out = capsys.readouterr()
    assert "device: cpu" in out.out and "compute dtype: float32" in out.out
    assert "make setup BACKEND=cuda" in out.err


def test_mlx_without_a_backend_is_named_with_the_fix(tmp_path):
    assert not runtime.mlx_backend_missing()  # this venv has one
    (tmp_path / "with" / "lib").mkdir(parents=True)
    (tmp_path / "with" / "lib" / "libmlx.so").write_bytes(b"")
    (tmp_path / "bindings-only").mkdir()
    assert runtime.mlx_backend_missing([str(tmp_path / "bindings-only")])
    assert not runtime.mlx_backend_missing([str(tmp_path / "with")])
    assert "mlx-pipeline[cpu]" in runtime.NO_BACKEND and "mlx-pipeline[cuda]" in runtime.NO_BACKEND


# --- make setup / pyproject ----------------------------------------------------------------------


def make_setup_dry_run(venv: Path, path: str, *args: str) -> str:
    out = subprocess.run(["make", "-n", "setup", f"VENV={venv}", *args], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PATH=path))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_setup_installs_the_cpu_backend_without_a_gpu(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    out = make_setup_dry_run(tmp_path / "venv", f"{bare}{os.pathsep}/usr/bin:/bin")
    assert 'pip install -q -e ".[test,inspect,cpu]"' in out
    assert "pip uninstall -q -y mlx-cuda-13 mlx-cuda-12" in out


def test_make_setup_picks_cuda_when_nvidia_smi_sees_a_gpu(tmp_path):
    path = f"{fake_nvidia_smi(tmp_path / 'bin13')}{os.pathsep}/usr/bin:/bin"
    out = make_setup_dry_run(tmp_path / "venv", path)
    assert 'pip install -q -e ".[test,inspect,cuda]"' in out and "pip uninstall -q -y mlx-cpu" in out
    old_driver = f"{fake_nvidia_smi(tmp_path / 'bin12', '12.4')}{os.pathsep}/usr/bin:/bin"
    assert 'pip install -q -e ".[test,inspect,cuda12]"' in make_setup_dry_run(tmp_path / "venv", old_driver)
    # BACKEND overrides the detection, and a venv keeps the backend it was set up with.
    assert 'pip install -q -e ".[test,inspect,cpu]"' in make_setup_dry_run(tmp_path / "venv", path, "BACKEND=cpu")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / ".backend").write_text("cpu\n")
    assert 'pip install -q -e ".[test,inspect,cpu]"' in make_setup_dry_run(tmp_path / "kept", path)


def test_pyproject_declares_backend_extras():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    assert '\n    "mlx==0.32.4",\n' in text and "mlx[cpu]==0.32.4; sys_platform == 'linux'\",\n" not in text
    assert '\ncpu = ["mlx[cpu]==0.32.4; sys_platform == \'linux\'"]\n' in text
    assert '\ncuda = ["mlx[cuda13]==0.32.4; sys_platform == \'linux\'"]\n' in text


# --- GPU training layers, checked on the CPU in float32 ------------------------------------------


def quantized_linear(in_dims=256, out_dims=128, bias=True) -> nn.QuantizedLinear:
    mx.random.seed(0)
    return nn.QuantizedLinear.from_linear(nn.Linear(in_dims, out_dims, bias=bias), group_size=64, bits=4)


@pytest.mark.parametrize("bias", [True, False])
def test_dequantized_matmul_matches_quantized_linear(bias):
    q = quantized_linear(bias=bias)
    d = DequantizedMatmulLinear.from_quantized(q)
    assert isinstance(d, nn.QuantizedLinear) and not tree_flatten(d.trainable_parameters())
    x = mx.random.normal((3, 7, 256))
    assert mx.allclose(d(x), q(x), atol=1e-5)

    def loss(layer, x):
        return (layer(x) * mx.arange(128)).sum()

    gq = mx.grad(partial(loss, q))(x)
    gd = mx.grad(partial(loss, d))(x)
    gd_compiled = mx.compile(mx.grad(partial(loss, d)))(x)
    assert mx.allclose(gd, gq, atol=1e-4, rtol=1e-5) and mx.allclose(gd_compiled, gq, atol=1e-4, rtol=1e-5)


def tiny_lora_model(quantized: bool):
    """A 2-layer mlx-lm Llama with LoRA on every projection, as 04 builds it."""
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = Model(ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
                            tie_word_embeddings=False))
    if quantized:
        nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys})
    for layer in model.layers:  # a non-zero adapter, so its gradient path is exercised
        for _, m in layer.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    return model


def loss_and_grads(model):
    from mlx_lm.tuner.trainer import default_loss

    batch = mx.random.randint(0, 512, (2, 17), key=mx.random.key(1))
    lengths = mx.array([[0, 17], [3, 12]])
    (loss, _), grads = mx.compile(lambda: nn.value_and_grad(model, default_loss)(model, batch, lengths))()
    return loss, dict(tree_flatten(grads))


def test_gpu_layers_train_the_same_function_and_adapter():
    """04's GPU swaps (dequantize + matmul, LoRA products in the input dtype) leave the loss and the
    adapter's gradients of a quantized model unchanged in float32, and the adapter's names too."""
    reference = tiny_lora_model(quantized=True)
    swapped = tiny_lora_model(quantized=True)
    assert use_dequantized_matmul(swapped) == 2 * 7 + 1  # every projection and lm_head
    assert use_compute_dtype_lora(swapped) == 2 * 7
    assert isinstance(swapped.layers[0].mlp.down_proj, ComputeDtypeLoRALinear)
    assert isinstance(swapped.layers[0].mlp.down_proj.linear, DequantizedMatmulLinear)
    loss_ref, grads_ref = loss_and_grads(reference)
    loss, grads = loss_and_grads(swapped)
    assert grads.keys() == grads_ref.keys() and all(k.endswith(("lora_a", "lora_b")) for k in grads)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    for k in grads:
        assert mx.allclose(grads[k], grads_ref[k], atol=1e-5, rtol=1e-4), k


def test_lora_product_runs_in_the_input_dtype_and_keeps_float32_weights():
    layer = ComputeDtypeLoRALinear.from_lora(LoRALinear.from_base(nn.Linear(64, 32), r=4))
    layer.linear.weight = layer.linear.weight.astype(mx.bfloat16)
    layer.linear.bias = layer.linear.bias.astype(mx.bfloat16)
    layer.linear.freeze()
    x = mx.random.normal((5, 64)).astype(mx.bfloat16)
    assert layer(x).dtype == mx.bfloat16
    grads = nn.value_and_grad(layer, lambda m, x: m(x).astype(mx.float32).sum())(layer, x)[1]
    assert {k: v.dtype for k, v in tree_flatten(grads)} == {"lora_a": mx.float32, "lora_b": mx.float32}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
