"""07 fuse in bounded memory: the streamed writer and forward pass compute what the whole-model
paths compute, and a machine without the memory a fuse needs is refused before anything is written.
Real MLX and mlx-lm on the tiny trained runs of tests/export_fixtures.py.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from export_fixtures import PROMPTS, copy_run, make_cfg
from pipeline import survival
from pipeline.errors import PipelineError
from pipeline.fsio import hash_model_dir, sha256_file
from pipeline.phases import p07_fuse_lora
from pipeline.phases.p07_fuse_lora import fuse

FLOAT32_TOL = 1e-4  # float32 summation order only (as in test_p07_fuse)


def test_streamed_writer_matches_mlx_lm_save_model(export_runs, tmp_path):
    """save_model_streamed writes the tensors, index and layout of mlx-lm's save_model, and the
    sha256 it reports is the file's."""
    from mlx_lm.utils import get_total_parameters, load_model, save_model

    from pipeline.modeling import save_model_streamed

    base = export_runs.trained("llama") / "t" / "base-quantized"
    model, _ = load_model(base, lazy=True)
    save_model(tmp_path / "reference", model)
    model, _ = load_model(base, lazy=True)
    weights = dict(tree_flatten(model.parameters()))
    parameters = get_total_parameters(model)
    del model
    hashes = save_model_streamed(tmp_path / "streamed", weights, parameters)
    assert not weights  # consumed
    ref, ours = tmp_path / "reference", tmp_path / "streamed"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert json.loads((ours / "model.safetensors.index.json").read_text()) == json.loads(
        (ref / "model.safetensors.index.json").read_text())
    a, b = mx.load(str(ref / "model.safetensors")), mx.load(str(ours / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert hashes == {"model.safetensors": sha256_file(ours / "model.safetensors")}


def test_fused_content_hash_is_hash_model_dir(export_runs):
    _, result = export_runs.fused("llama", dequantize=True, dtype="float32")
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["outputs"]["content_hash"] == hash_model_dir(result.path)


def test_streamed_forward_equals_the_loaded_model(export_runs):
    """load_streamed + forward_streamed (lazy weights, float32 per layer, rows padded at the end)
    give the logits of the model loaded whole in float32 with its adapter, row by row."""
    from mlx_lm.utils import load

    from pipeline.modeling import cast_floats, forward_streamed, load_streamed

    run = export_runs.trained("llama") / "t"
    model, tok = load(str(run / "base-quantized"), adapter_path=str(run / "adapters"))
    cast_floats(model, mx.float32)
    rows = [tok.encode(p) for p in PROMPTS]
    whole = [model(mx.array(r)[None])[0] for r in rows]
    streamed = forward_streamed(load_streamed(run / "base-quantized", run / "adapters"), rows)
    for i, r in enumerate(rows):
        diff = mx.abs(streamed[i, : len(r)] - whole[i]).max().item()
        assert diff <= FLOAT32_TOL, (i, diff)


def test_gated_pass_gives_trained_and_base(export_runs):
    """Trained and base in one pass (the LoRA scale gated per row) equal two separate passes."""
    from mlx_lm.utils import load_tokenizer

    from pipeline import agreement

    run = export_runs.trained("llama") / "t"
    base, adapters = run / "base-quantized", run / "adapters"
    convs = agreement.conversations(load_tokenizer(base), agreement.read_rows(run / "data" / "valid.jsonl", 3))
    trained, without = survival._scores(base, convs, adapters, gate=True)
    trained_alone, base_alone = survival._scores(base, convs, adapters), survival._scores(base, convs)
    for c in convs:
        assert np.abs(trained(c, survival.SPAN) - trained_alone(c, survival.SPAN)).max() <= FLOAT32_TOL
        assert np.abs(without(c, survival.SPAN) - base_alone(c, survival.SPAN)).max() <= FLOAT32_TOL
    assert np.abs(trained(convs[0], survival.SPAN) - without(convs[0], survival.SPAN)).max() > 1e-2


def test_end_to_end_rows_within_budget():
    class Conv:
        def __init__(self, n):
            self.ids = [0] * n

    convs = [Conv(100), Conv(100), Conv(100)]
    assert len(survival._within_budget(convs, 10)) == 3
    assert len(survival._within_budget(convs, int(survival.E2E_BUDGET / 250))) == 2
    assert len(survival._within_budget(convs, 10**12)) == 1  # at least one row, however large the model


def test_available_memory_is_read():
    assert p07_fuse_lora.available_memory() > 0


def test_refused_before_any_work_without_the_memory(export_runs, monkeypatch):
    root = export_runs.trained("llama")
    run = copy_run(root, "no-memory")
    monkeypatch.setattr(p07_fuse_lora, "available_memory", lambda: 100_000_000)
    with pytest.raises(PipelineError) as e:
        fuse(make_cfg(root, run="no-memory", fuse__dequantize=True))
    msg = str(e.value)
    assert "100.0 MB is available" in msg and "one layer at a time" in msg and "--no-dequantize" in msg
    assert "more memory" in msg
    assert not (run / "fused").exists() and not list(run.glob(".fused*"))


def test_note_when_the_dequantized_output_exceeds_memory(export_runs, monkeypatch, capsys):
    """Enough memory for the streamed fuse (one layer at a time) but less than its output: no
    refusal, a note that loading it whole later will not fit."""
    adapters = export_runs.trained("llama") / "t" / "adapters"
    weights = {f"layers.{i}.weight": mx.zeros((1000, 1000)) for i in range(10)}  # lazy: 40 MB, 1e6 per layer
    monkeypatch.setattr(p07_fuse_lora, "PROCESS_BYTES", 0)
    monkeypatch.setattr(p07_fuse_lora, "available_memory", lambda: 20_000_000)
    p07_fuse_lora.check_memory(weights, adapters, dequantize=True)
    out = capsys.readouterr().out
    assert "(40.0 MB) is larger than the memory available now (20.0 MB)" in out and "--no-dequantize" in out
    monkeypatch.setattr(p07_fuse_lora, "available_memory", lambda: 5_000_000)
    with pytest.raises(PipelineError, match="but only 5.0 MB is available"):
        p07_fuse_lora.check_memory(weights, adapters, dequantize=True)


def test_dora_fuse_is_base_plus_adapter_with_survival(tiny_hf_model, tmp_path):
    """DoRA layers: fused weights rated on sampled rows and trained vs base in two passes (no gate)."""
    from export_fixtures import max_abs, mlx_logits
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    from pipeline.phases.p03_quantize_base_model import quantize_base_model
    from pipeline.phases.p04_train_lora import train_lora

    cfg = make_cfg(tmp_path, tiny_hf_model("llama"), train__fine_tune_type="dora")
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    train_lora(cfg)
    result = fuse(make_cfg(tmp_path, fuse__dequantize=True, fuse__dtype="float32"))
    run = tmp_path / "t"
    adapted = mlx_logits(run / "base-quantized", run / "adapters")
    assert max_abs(mlx_logits(result.path), adapted) <= FLOAT32_TOL
    layers, e2e = result.survival["layers"], result.survival["end_to_end"]
    assert layers["mean_survival"] == pytest.approx(1, abs=1e-3) and layers["max_error"] < 1e-3
    assert e2e["kl_trained_vs_base"] > 1e-4 and e2e["ratio"] < 1e-2


def test_end_to_end_skipped_only_for_large_exact_fuses():
    big, small = 2 * survival.E2E_ALWAYS_PARAMETERS, survival.E2E_ALWAYS_PARAMETERS // 2
    exact, requantized = {"max_error": 0.07}, {"max_error": 1.48, "overall_error": 1.47}
    assert survival.end_to_end_needed(exact, small) is None
    assert survival.end_to_end_needed(requantized, big) is None  # a de-quantized fuse that is not exact
    assert survival.end_to_end_needed(requantized, small, requantized=True) is None
    assert survival.end_to_end_needed(requantized, big, requantized=True, strict=True) is None
    assert survival.end_to_end_needed({"rated_layers": 0}, big, requantized=True) is None
    reason = survival.end_to_end_needed(exact, big)
    assert "0.070 of W + dW" in reason and "skipped" in reason
    assert f"end to end: {reason}" in survival.summary_lines({"end_to_end_skipped": reason})
    assert survival.lost({"layers": exact, "end_to_end_skipped": reason}) is False  # known: exact up to rounding
    unmeasured = survival.end_to_end_needed(requantized, big, requantized=True)
    assert unmeasured.startswith("NOT MEASURED") and "147%" in unmeasured and "--strict" in unmeasured
    assert survival.lost({"layers": requantized, "end_to_end_skipped": unmeasured}) is None  # unknown, not "kept"


def test_large_requantized_fuse_is_measured_with_strict(export_runs, monkeypatch, capsys):
    """Above the size limit a re-quantized fuse skips the end-to-end pass and records its verdict as
    unknown; --strict runs it, and still refuses an adapter that re-quantization rounded away."""
    from export_fixtures import shrink_adapter

    monkeypatch.setattr(survival, "E2E_ALWAYS_PARAMETERS", 0)
    root = export_runs.trained("llama")
    shrink_adapter(copy_run(root, "big-unmeasured"))
    result = p07_fuse_lora.fuse(make_cfg(root, run="big-unmeasured"))
    report = json.loads((result.path / "manifest.json").read_text())["survival"]
    assert report["lost"] is None and "end_to_end" not in report
    assert report["end_to_end_skipped"].startswith("NOT MEASURED")
    assert "end to end: NOT MEASURED" in capsys.readouterr().out
    run = shrink_adapter(copy_run(root, "big-strict"))
    with pytest.raises(PipelineError, match="most of the fine-tune was lost"):
        p07_fuse_lora.fuse(make_cfg(root, run="big-strict", fuse__strict=True))
    assert not (run / "fused").exists()


@pytest.mark.parametrize("dequantize", [False, True])
def test_fuse_in_blocks_of_rows_is_the_whole_layer_fuse(export_runs, monkeypatch, dequantize):
    """Fused layers computed and written in blocks of rows (one row each here; most blocks then hold
    no sampled row) give the same files, bit for bit, and the same survival figures."""
    root = export_runs.trained("llama")
    whole = _fuse_copy(root, f"rows-whole-{dequantize}", dequantize)
    monkeypatch.setattr(p07_fuse_lora, "FUSE_ELEMENTS", 1)
    blocks = _fuse_copy(root, f"rows-one-{dequantize}", dequantize)
    a, b = (mx.load(str(r.path / "model.safetensors")) for r in (whole, blocks))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    for key in ("mean_survival", "min_survival", "mean_error", "max_error"):
        assert blocks.survival["layers"][key] == pytest.approx(whole.survival["layers"][key], rel=1e-4), key
    assert (blocks.delta_error is None) == dequantize
    if not dequantize:
        assert blocks.delta_error == pytest.approx(whole.delta_error, rel=1e-3)


def _fuse_copy(root, run, dequantize):
    copy_run(root, run)
    return p07_fuse_lora.fuse(make_cfg(root, run=run, fuse__dequantize=dequantize, fuse__dtype="bfloat16"))


def test_streamed_forward_in_blocks_of_rows(export_runs, monkeypatch):
    """The streamed pass's float32 weights one row at a time give the logits of whole layers (up to
    float32 summation order: BLAS blocks other shapes differently)."""
    from pipeline import modeling

    run = export_runs.trained("llama") / "t"
    rows = [[1, 5, 9, 13], [2, 4]]
    whole = modeling.forward_streamed(modeling.load_streamed(run / "base-quantized", run / "adapters"), rows)
    monkeypatch.setattr(modeling, "STREAM_ELEMENTS", 1)
    blocks = modeling.forward_streamed(modeling.load_streamed(run / "base-quantized", run / "adapters"), rows)
    assert mx.abs(whole - blocks).max().item() <= FLOAT32_TOL
