"""07 fuse on tiny QLoRA-trained runs of every architecture: real MLX, real mlx-lm, no mocks.

The reference is the genuine 4-bit base with the adapter loaded (mlx-lm's LoRA layers), all
logits in float32 (MLX's CPU quantized matmul is inaccurate in bf16, PLATFORM_NOTES).
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from export_fixtures import ARCHS, copy_run, make_cfg, max_abs, mlx_logits, rms, shrink_adapter
from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.phases.p03_quantize_base_model import quantize_base_model
from pipeline.phases.p07_fuse_lora import TOKENIZER_FILES, fuse

# Dequantized in float32: the fused weights are W + dW exactly; only float32 summation order
# differs (measured max |logit diff| 9e-7 .. 1.4e-5).
FLOAT32_TOL = 1e-4
# Dequantized in bf16: each weight rounded once to 8 significant bits (relative 2^-9); through a
# few layers that is ~1 % of the logits' spread. Bound: max diff <= 3 % of max |logit|.
BF16_REL = 0.03


@pytest.mark.parametrize("model_type", ARCHS)
def test_no_dequantize_is_mlx_lm_fuse_and_keeps_the_adapter(export_runs, model_type):
    """--no-dequantize re-quantizes W + dW, so it differs from base + adapter by the rounding error
    of that re-quantization. Checks: (1) it is exactly what mlx-lm's own fuse produces; (2) that
    error is small next to what the adapter itself does to the logits: RMS at most half the
    adapter's RMS effect (measured 0.06 .. 0.25) and the worst logit no further from base + adapter
    than the base is (measured 0.27 .. 0.77 of the adapter's max effect)."""
    root = export_runs.trained(model_type)
    base, adapted = export_runs.reference(model_type)
    cfg, result = export_runs.fused(model_type, dequantize=False)
    fused = mlx_logits(result.path)
    reference_fuse = mlx_logits(root / "t" / "base-quantized", root / "t" / "adapters", fuse_with_mlx_lm=True)
    effect_max, effect_rms = max_abs(adapted, base), rms(adapted, base)
    diff_max, diff_rms = max_abs(fused, adapted), rms(fused, adapted)
    print(f"{model_type} --no-dequantize: max|fused - (base+adapter)| {diff_max:.4g} (rms {diff_rms:.4g}); "
          f"adapter effect max {effect_max:.4g} (rms {effect_rms:.4g}); delta error {result.delta_error}")
    assert max_abs(fused, reference_fuse) <= 1e-5
    assert effect_rms > 0.1  # the adapter is not trivial, or this test would prove nothing
    assert diff_rms <= 0.5 * effect_rms
    assert diff_max < effect_max
    assert result.delta_error is not None and result.delta_error < 0.5  # no warning for this adapter
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_equals_base_plus_adapter(export_runs, model_type, dtype):
    _, adapted = export_runs.reference(model_type)
    cfg, result = export_runs.fused(model_type, dequantize=True, dtype=dtype)
    fused = mlx_logits(result.path)
    diff, scale = max_abs(fused, adapted), mx.abs(adapted).max().item()
    print(f"{model_type} --de-quantize {dtype}: max|fused - (base+adapter)| {diff:.3g} (max |logit| {scale:.3g})")
    assert diff <= (FLOAT32_TOL if dtype == "float32" else BF16_REL * scale)
    config = json.loads((result.path / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == dtype
    assert result.delta_error is None


@pytest.mark.parametrize("model_type", ARCHS)
def test_sizes_and_report(export_runs, model_type):
    _, q = export_runs.fused(model_type, dequantize=False)
    _, d = export_runs.fused(model_type, dequantize=True, dtype="bfloat16")
    quantized_base = q.sizes["base"]
    print(f"{model_type}: quantized base {quantized_base} B, adapter {q.sizes['adapter']} B, "
          f"--no-dequantize {q.sizes['fused']} B, --de-quantize bf16 {d.sizes['fused']} B, "
          f"{d.parameters:,} parameters (x 2 = {2 * d.parameters} B)")
    assert q.sizes["fused"] <= 1.1 * quantized_base
    assert d.parameters == q.parameters
    assert d.sizes["fused"] == pytest.approx(2 * d.parameters, rel=0.05)
    report = json.loads((q.path / "manifest.json").read_text())["report"]
    assert report["parameters"] == q.parameters and report["fused"] == q.sizes["fused"]
    text = "\n".join(report["explanation"])
    # Float32 tiny bases: 4-bit values + 32-bit scale and bias per 32 weights = 6 bits per weight.
    assert "4 + 2 x 32 / 32 = 6.00 bits per weight" in text and "parameters x 2 bytes" in text
    # mlx-lm keeps some granite layers (o_proj, down_proj, lm_head) at 8 bits: above 6 there.
    assert 6.0 <= report["bits_per_weight"] <= 9.0


def test_fused_folder_is_a_complete_model(export_runs):
    cfg, result = export_runs.fused("llama", dequantize=False)
    run = result.path.parent
    for pattern in TOKENIZER_FILES:
        for f in (run / "base").glob(pattern):
            assert (result.path / f.name).read_bytes() == f.read_bytes(), f.name
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["inputs"]["base"]["content_hash"] == json.loads(
        (run / "base-quantized" / "manifest.json").read_text())["outputs"]["content_hash"]
    assert manifest["dequantized"] is False and manifest["fused_layers"] == 14
    assert not list(run.glob(".fused*"))


def test_warns_when_requantization_buries_a_small_adapter(export_runs, capsys):
    """Scale the trained adapter down 1000x: re-quantization then rounds it into noise."""
    root = export_runs.trained("llama")
    shrink_adapter(copy_run(root, "tiny-delta"))
    result = fuse(make_cfg(root, run="tiny-delta"))
    assert result.delta_error > 1
    assert "Fuse with --de-quantize" in capsys.readouterr().out


def test_refuses_an_adapter_trained_on_another_base(export_runs):
    root = export_runs.trained("llama")
    run = copy_run(root, "other-base")
    # Same model, quantized differently: a different training base than the adapter's.
    quantize_base_model(make_cfg(root, run="other-base", quantize__group_size=64))
    with pytest.raises(PipelineError) as e:
        fuse(make_cfg(root, run="other-base"))
    msg = str(e.value)
    assert str(run / "base-quantized") in msg and str(root / "t" / "base-quantized") in msg
    adapter_hash = json.loads((run / "adapters" / "adapter_config.json").read_text())["base_model"]["content_hash"]
    assert adapter_hash[:16] in msg and "retrain on this base" in msg and "--base-model" in msg
    assert not (run / "fused").exists() and not list(run.glob(".fused*"))


def test_full_fine_tuning_adapter(tiny_hf_model, tmp_path):
    """fine_tune_type full: the adapter holds the trained weights themselves; nothing to fuse."""
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    from pipeline.phases.p04_train_lora import train_lora

    cfg = make_cfg(tmp_path, tiny_hf_model("granite"), train__fine_tune_type="full", quantize__enabled=False,
                   train__num_layers=1, train__iters=2, train__learning_rate=1e-3)
    fetch_base_model(cfg)
    prepare_data(cfg)
    train_lora(cfg)
    result = fuse(make_cfg(tmp_path, quantize__enabled=False, fuse__dequantize=True, fuse__dtype="float32"))
    assert result.fused_layers == 0
    run = tmp_path / "t"
    base, adapted = mlx_logits(run / "base"), mlx_logits(run / "base", run / "adapters")
    assert max_abs(adapted, base) > 1e-3
    assert max_abs(mlx_logits(result.path), adapted) <= FLOAT32_TOL


def test_cli_fuse(export_runs, monkeypatch, tmp_path):
    for var in ("TEST_MODE", "RUN", "MODELS_DIR", "DEQUANTIZE", "QUANTIZE"):
        monkeypatch.delenv(var, raising=False)
    root = export_runs.trained("granite")
    copy_run(root, "cli")
    r = CliRunner().invoke(cli.main, ["fuse", "--models-dir", str(root), "--run", "cli", "--de-quantize"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((root / "cli" / "fused" / "manifest.json").read_text())
    assert manifest["dequantized"] is True and manifest["dtype"] == "bfloat16"
    assert "parameters x 2 bytes" in r.output

    r = CliRunner().invoke(cli.main, ["fuse", "--models-dir", str(tmp_path), "--run", "none"])
    assert r.exit_code == 2
    assert "make train" in r.output and "Traceback" not in r.output
