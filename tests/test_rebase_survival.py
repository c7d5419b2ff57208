"""07 fuse --rebase and the adapter survival report, on a tiny QLoRA-trained llama: real MLX, real mlx-lm.

--rebase adds the adapter (trained on base-quantized/) to the original full-precision base/;
the reference is mlx-lm's LoRA layers loaded onto that dense base, logits in float32.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from export_fixtures import copy_run, make_cfg, max_abs, mlx_logits, shrink_adapter
from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.fsio import hash_model_dir
from pipeline.phases.p07_fuse_lora import fuse

FLOAT32_TOL = 1e-4  # float32 summation order only (as in test_p07_fuse)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_rebase_is_dense_base_plus_adapter(export_runs):
    root = export_runs.trained("llama")
    run = copy_run(root, "rebase")
    result = fuse(make_cfg(root, run="rebase", fuse__rebase=True, fuse__dtype="float32"))
    expected = mlx_logits(run / "base", run / "adapters")  # dense original base + adapter
    fused = mlx_logits(result.path)
    diff = max_abs(fused, expected)
    effect = max_abs(expected, mlx_logits(run / "base"))
    print(f"rebase: max|fused - (base + adapter)| {diff:.3g}; adapter effect {effect:.3g}")
    assert effect > 1e-2 and diff <= FLOAT32_TOL
    config = json.loads((result.path / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32"
    assert all(v.dtype == mx.float32 for v in mx.load(str(result.path / "model.safetensors")).values())
    manifest = _manifest(result.path)
    base_hash = _manifest(run / "base")["outputs"]["content_hash"]
    assert manifest["rebased"] is True and manifest["dequantized"] is True
    assert manifest["original_base_content_hash"] == base_hash
    assert manifest["inputs"]["base"] == {"path": str(run / "base"), "content_hash": base_hash}
    trained_on = _manifest(run / "base-quantized")["outputs"]["content_hash"]
    assert manifest["inputs"]["trained_on"]["content_hash"] == trained_on
    survival = manifest["survival"]
    assert survival["layers"]["mean_survival"] == pytest.approx(1, abs=1e-3)
    assert survival["layers"]["max_error"] < 1e-3
    assert result.rebased and not survival["lost"]


def test_rebase_refused_when_quantized_base_was_made_from_another_base(export_runs):
    root = export_runs.trained("llama")
    run = copy_run(root, "rebase-other")
    qm = run / "base-quantized" / "manifest.json"
    manifest = json.loads(qm.read_text())
    manifest["inputs"]["base_content_hash"] = "0" * 64  # quantized from some other base
    qm.write_text(json.dumps(manifest))
    with pytest.raises(PipelineError) as e:
        fuse(make_cfg(root, run="rebase-other", fuse__rebase=True))
    assert "--rebase refused" in str(e.value) and "0000000000000000" in str(e.value)
    assert not (run / "fused").exists() and not list(run.glob(".fused*"))

    # And when base/ itself was replaced after quantization (its weights/config changed).
    base_hash = _manifest(run / "base")["outputs"]["content_hash"]
    qm.write_text(json.dumps({**manifest, "inputs": {**manifest["inputs"], "base_content_hash": base_hash}}))
    config = json.loads((run / "base" / "config.json").read_text())
    (run / "base" / "config.json").write_text(json.dumps({**config, "rope_theta": 12345.0}))
    with pytest.raises(PipelineError, match="changed since"):  # edited behind its manifest
        fuse(make_cfg(root, run="rebase-other", fuse__rebase=True))
    bm = run / "base" / "manifest.json"  # as if phase 02 had fetched another base since
    bm.write_text(json.dumps({**_manifest(run / "base"), "outputs": {
        **_manifest(run / "base")["outputs"], "content_hash": hash_model_dir(run / "base")}}))
    with pytest.raises(PipelineError, match="--rebase refused"):
        fuse(make_cfg(root, run="rebase-other", fuse__rebase=True))
    assert not (run / "fused").exists()


def test_survival_report_for_dequantize_fuse(export_runs):
    cfg, result = export_runs.fused("llama", dequantize=True, dtype="float32")
    survival = _manifest(result.path)["survival"]
    layers, e2e = survival["layers"], survival["end_to_end"]
    print(json.dumps(survival))
    assert layers["rated_layers"] == 14 and layers["layers"] == 14
    for key in ("mean_survival", "min_survival", "mean_error", "max_error", "worst_layers"):
        assert key in layers
    assert layers["mean_survival"] == pytest.approx(1, abs=1e-3) and layers["min_survival"] > 0.99
    assert layers["max_error"] < 1e-3
    assert {"layer", "survival", "error"} <= set(layers["worst_layers"][0])
    assert e2e["rows"] > 0 and e2e["positions"] > 0
    assert e2e["kl_trained_vs_base"] > 1e-3  # the adapter matters
    assert e2e["ratio"] < 1e-2 and survival["lost"] is False
    assert result.survival == survival


def _tiny_adapter_run(root, name):
    return shrink_adapter(copy_run(root, name))


def test_tiny_adapter_warns_and_strict_refuses(export_runs, capsys):
    """A 1000x smaller adapter is rounded away by re-quantization: the fused model is no closer to
    base + adapter than the base is."""
    root = export_runs.trained("llama")
    _tiny_adapter_run(root, "tiny-survival")
    result = fuse(make_cfg(root, run="tiny-survival"))
    out = capsys.readouterr().out
    survival = _manifest(result.path)["survival"]
    print(json.dumps(survival))
    assert survival["lost"] is True and survival["end_to_end"]["ratio"] > 0.5
    assert survival["layers"]["mean_error"] > 1  # rounding noise larger than the delta
    assert "most of the fine-tune was lost" in out
    for option in ("--rebase", "--de-quantize", "native GGUF", "LoRA GGUF", "--strict"):
        assert option in out

    run = _tiny_adapter_run(root, "tiny-strict")
    with pytest.raises(PipelineError, match="most of the fine-tune was lost"):
        fuse(make_cfg(root, run="tiny-strict", fuse__strict=True))
    assert not (run / "fused").exists() and not list(run.glob(".fused*"))


def test_cli_rebase_strict(export_runs, monkeypatch):
    for var in ("TEST_MODE", "RUN", "MODELS_DIR", "DEQUANTIZE", "QUANTIZE"):
        monkeypatch.delenv(var, raising=False)
    root = export_runs.trained("llama")
    copy_run(root, "cli-rebase")
    r = CliRunner().invoke(cli.main, ["fuse", "--models-dir", str(root), "--run", "cli-rebase", "--rebase", "--strict"])
    assert r.exit_code == 0, r.output
    manifest = _manifest(root / "cli-rebase" / "fused")
    assert manifest["rebased"] is True and manifest["dtype"] == "bfloat16"
    assert "adapter survival" in r.output and "end to end" in r.output
