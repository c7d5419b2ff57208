"""Importance matrix from the training split (issue 4 part 5) and the side-by-side export paths.

Real llama.cpp tools built from the pinned sdist (llama-imatrix, llama-quantize), real MLX fuse,
real converter, on the tiny trained llama run of tests/export_fixtures.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export_fixtures import copy_run, make_cfg
from pipeline import llamacpp
from pipeline.errors import DataError, MissingInputError

IMATRIX_KEYS = {"gguf.quantizations": ["Q4_K_M", "Q8_0"], "gguf.imatrix": True,
                "gguf.imatrix_chunk_tokens": 128, "gguf.imatrix_chunks": 3, "gguf.threads": 2}


@pytest.fixture(scope="module")
def imatrix_run(export_runs):
    """The trained tiny llama run, fused --de-quantize and exported with gguf.imatrix."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    cfg, _ = export_runs.fused("llama", dequantize=True)
    cfg = make_cfg(cfg.models_dir, run=cfg.run, fuse__dequantize=True, **IMATRIX_KEYS)
    return cfg, convert_to_gguf(cfg)


def _tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in GGUFReader(str(path)).tensors}


def test_imatrix_is_computed_from_the_chat_rendered_training_split(imatrix_run):
    cfg, result = imatrix_run
    folder = Path(cfg.models_dir) / cfg.run / "imatrix"
    text = (folder / "calibration.txt").read_text()
    train = [json.loads(line)
             for line in (Path(cfg.models_dir) / cfg.run / "data" / "train.jsonl").read_text().splitlines()]
    # Rendered through the chat template: the special tokens are there, and every training answer.
    assert "<|im_start|>assistant" in text
    assert all(row["messages"][-1]["content"] in text for row in train)

    entries = _tensors(folder / "imatrix.gguf")
    sums = {n[: -len(".in_sum2")]: v for n, (_, v) in entries.items() if n.endswith(".in_sum2")}
    # Every linear layer's inputs were seen (the output layer is excluded by llama.cpp's default).
    assert {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_output.weight"} <= set(sums)
    for name, v in sums.items():
        assert np.isfinite(v).all() and (v >= 0).all() and v.sum() > 0, name
    stats = json.loads((result.path / "manifest.json").read_text())["imatrix"]
    assert stats["tokens"] > 3 * 128 * 2  # more text than the cap: gguf.imatrix_chunks bounds the work
    assert stats["chunks"] == 3 and stats["tokens_used"] == 3 * 128


def test_imatrix_changes_the_quantization_and_the_file_runs_in_llama_cpp(imatrix_run):
    import llama_cpp

    cfg, result = imatrix_run
    plain, guided = result.files["Q4_K_M"], result.files["Q4_K_M-imatrix"]
    a, b = _tensors(plain), _tensors(guided)
    assert a.keys() == b.keys()
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # same types per tensor
    changed = [k for k in a if not np.array_equal(a[k][1], b[k][1])]
    # The matrix reached the quantizer: quantized weight tensors differ, unquantized ones do not.
    assert any(k.startswith("blk.") and k.endswith(".weight") for k in changed), changed
    assert not [k for k in changed if a[k][0] in ("F32", "F16")]
    assert "Q8_0-imatrix" not in result.files  # llama.cpp ignores an imatrix for Q8_0: no duplicate file
    llm = llama_cpp.Llama(model_path=str(guided), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"hello")) > 0


def test_verify_reports_the_imatrix_difference(imatrix_run):
    from pipeline.phases.p10_verify_gguf import verify_gguf

    cfg, _ = imatrix_run
    report = verify_gguf(cfg)
    rows = {r["file"]: r for r in report.rows}
    guided = rows[f"{cfg.run}-Q4_K_M-imatrix.gguf"]
    assert guided["kl"] is not None and guided["path"] == "fuse --de-quantize + imatrix"
    notes = json.loads((report.path / "report.json").read_text())["notes"]
    assert any(n.startswith(f"imatrix: {cfg.run}-Q4_K_M.gguf KL") for n in notes), notes
    assert "made by" in (report.path / "report.md").read_text()


def test_too_little_training_text_is_a_clear_error(export_runs, tmp_path):
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    cfg, _ = export_runs.fused("llama", dequantize=True)
    shutil.copytree(Path(cfg.models_dir) / cfg.run, tmp_path / cfg.run)
    cfg = make_cfg(tmp_path, run=cfg.run, fuse__dequantize=True,
                   **{**IMATRIX_KEYS, "gguf.imatrix_chunk_tokens": 100000})
    with pytest.raises(DataError, match="needs at least 200000"):
        convert_to_gguf(cfg)


def test_missing_tools_name_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PIPELINE_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(MissingInputError, match="python -m pipeline.llamacpp build-tools"):
        llamacpp.tool("llama-imatrix")


def test_native_gguf_from_a_dequantized_fuse_fuses_again_without_dequantizing(export_runs):
    """gguf.native with fused/ de-quantized: a --no-dequantize fuse into fused-native/ is transcoded,
    and its weights read back equal that MLX model's (the same check as for a --no-dequantize run)."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    cfg, _ = export_runs.fused("llama", dequantize=True)
    root = Path(cfg.models_dir)
    copy_run(root, "native-side")
    shutil.copytree(root / cfg.run / "fused", root / "native-side" / "fused")
    cfg = make_cfg(root, run="native-side", fuse__dequantize=True, gguf__native=True,
                   **{"gguf.quantizations": ["Q8_0"]})
    result = convert_to_gguf(cfg)
    run = root / "native-side"
    side = json.loads((run / "fused-native" / "manifest.json").read_text())
    assert side["dequantized"] is False and (run / "fused" / "manifest.json").is_file()
    assert not list((run / "hf-native").glob("*.gguf*")) and not list((run / "hf-native").glob(".*gguf"))
    native = json.loads((result.path / "manifest.json").read_text())["native"]
    assert native["source"].endswith("fused-native") and native["transcoded"] > 0
    assert native["max_abs_diff"] <= native["max_abs_diff_bound"] * 1.001
    assert result.files["Q4_1-native"].is_file()
    from pipeline.phases.p10_verify_gguf import native_notes

    (note,) = native_notes(json.loads((result.path / "manifest.json").read_text()))
    assert note.startswith("native: native-side-Q4_1-native.gguf holds the MLX weights of fused-native/")
    assert f"is {side['survival']['end_to_end']['ratio']:.0%} of KL(trained || base)" in note
