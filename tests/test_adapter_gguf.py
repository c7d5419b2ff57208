"""The MLX adapter as a llama.cpp LoRA GGUF: PEFT layout, refusals, and base GGUF + LoRA in llama.cpp
behaving like MLX base + adapter (KL near the F16 floor, far below the base GGUF alone)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export_fixtures import copy_run, make_cfg
from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def adapter_run(export_runs):
    from pipeline.adapter_gguf import write_adapter_gguf

    root = export_runs.trained("llama")
    copy_run(root, "lora-gguf")
    cfg = make_cfg(root, run="lora-gguf", verify__max_rows=3, eval__max_tokens=8)
    return cfg, write_adapter_gguf(cfg)


def test_peft_delta_equals_mlx_delta(export_runs, tmp_path):
    import mlx.core as mx
    from safetensors.numpy import load_file

    from pipeline.adapter_gguf import mlx_to_peft

    adapters = export_runs.trained("llama") / "t" / "adapters"
    stats = mlx_to_peft(adapters, tmp_path / "peft", {"tie_word_embeddings": True})
    pcfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pcfg["peft_type"] == "LORA" and pcfg["lora_alpha"] / pcfg["r"] == stats["scale"]
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mlx = mx.load(str(adapters / "adapters.safetensors"))
    name = next(k for k in mlx if k.endswith("q_proj.lora_a"))
    a, b = np.array(mlx[name].astype(mx.float32)), np.array(mlx[name[:-1] + "b"].astype(mx.float32))
    prefix = "base_model.model." + name[: -len(".lora_a")]
    A, B = peft[prefix + ".lora_A.weight"], peft[prefix + ".lora_B.weight"]
    assert A.shape == (pcfg["r"], a.shape[0]) and B.shape == (b.shape[1], pcfg["r"])
    # MLX: y = x W^T + scale * (x a) b  ->  delta W = scale * b^T a^T ; PEFT: (alpha / r) * B A
    np.testing.assert_allclose(pcfg["lora_alpha"] / pcfg["r"] * B @ A, stats["scale"] * b.T @ a.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_refuses_non_lora(export_runs, tmp_path, kind):
    from pipeline.adapter_gguf import mlx_to_peft

    src = export_runs.trained("llama") / "t" / "adapters"
    dst = tmp_path / "adapters"
    dst.mkdir()
    shutil.copy(src / "adapters.safetensors", dst)
    acfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(dict(acfg, fine_tune_type=kind)))
    with pytest.raises(PipelineError, match="DoRA" if kind == "dora" else "Full fine-tuning"):
        mlx_to_peft(dst, tmp_path / "peft", {})


def test_refuses_tied_lm_head(tmp_path):
    import mlx.core as mx

    from pipeline.adapter_gguf import mlx_to_peft

    d = tmp_path / "adapters"
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), {"lm_head.lora_a": mx.zeros((16, 4)), "lm_head.lora_b": mx.zeros((4, 32))})
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                       "lora_parameters": {"rank": 4, "scale": 2.0, "keys": ["lm_head"]}}))
    with pytest.raises(PipelineError, match="ties it"):
        mlx_to_peft(d, tmp_path / "peft", {"tie_word_embeddings": True})


def test_adapter_gguf_files(adapter_run):
    from gguf import GGUFReader

    cfg, result = adapter_run
    reader = GGUFReader(result["adapter_gguf"])
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(result["lora_alpha"])
    names = [t.name for t in reader.tensors]
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert len(names) == 2 * result["modules"]
    assert result["base"]["dequantized"] is True  # QLoRA: paired with the dequantized training base


def test_llamacpp_base_plus_lora_matches_mlx(adapter_run):
    from pipeline.adapter_gguf import compare_with_mlx

    cfg, result = adapter_run
    report = compare_with_mlx(cfg, max_rows=3)
    with_lora, alone = report["gguf_base_lora"]["kl"], report["gguf_base_alone"]["kl"]
    assert with_lora < 5e-3, report
    assert alone > 20 * with_lora, report  # the LoRA GGUF carries the fine-tune
    assert report["gguf_base_lora"]["top1_percent"] >= 95.0, report


def test_reuses_current_base(adapter_run):
    from pipeline.adapter_gguf import write_adapter_gguf

    cfg, first = adapter_run
    again = write_adapter_gguf(cfg)
    assert again["base"]["reused"] is True and again["base"]["sha256"] == first["base"]["sha256"]
    assert again["adapter_sha256"] == first["adapter_sha256"]


def test_gguf_and_verify_phases_carry_the_lora(export_runs, tmp_path):
    """`mlx-pipeline gguf --adapter-gguf` writes the pair; `verify` measures base + LoRA, not as a model."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf
    from pipeline.phases.p10_verify_gguf import verify_gguf

    fused_cfg, _ = export_runs.fused("llama", dequantize=True, dtype="float32")
    shutil.copytree(fused_cfg.run_dir, tmp_path / "t", ignore=shutil.ignore_patterns("hf", "gguf", "verify"))
    cfg = make_cfg(tmp_path, gguf__quantizations="Q8_0", gguf__adapter_gguf=True, verify__max_rows=2,
                   verify__max_samples=0)
    result = convert_to_gguf(cfg)
    manifest = json.loads((tmp_path / "t" / "gguf" / "manifest.json").read_text())
    assert manifest["outputs"]["adapter_gguf"]["modules"] > 0
    assert sorted(result.files) == ["F16", "Q8_0"]
    report = verify_gguf(cfg)
    data = json.loads((report.path / "report.json").read_text())
    assert [r["file"] for r in data["models"]][:2] == ["t-F16.gguf", "t-Q8_0.gguf"]  # the pair is not a model row
    lora = data["adapter_gguf"]["gguf_base_lora"]
    assert lora["kl"] < data["adapter_gguf"]["gguf_base_alone"]["kl"] / 20
