"""08 MLX -> Hugging Face on tiny QLoRA-trained runs: real mlx-lm, real transformers, no mocks.

The export must be the same function as the fused MLX model: transformers' float32 logits vs
MLX's float32 logits, as next-token KL divergence, from a quantized and from a dequantized fused
model of every architecture; and a folder in the checkpoint's own form (names, config, tokenizer).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import fixture_config
from export_fixtures import ARCHS, PROMPTS, make_cfg, mlx_logits
from pipeline import arch, cli
from pipeline.phases.p07_fuse_lora import TOKENIZER_FILES
from pipeline.phases.p08_convert_to_hf import INDEX, convert_to_hf

MAX_KL = {"bfloat16": 1e-3, "float32": 1e-5}  # measured <= 1.8e-4 (bf16), <= 1.5e-7 (float32)
SHARD_GB = 0.004  # 4 MB: every tiny model is written in several shards


def _kl_per_token(p_logits, q_logits) -> float:
    import torch

    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def _hf_logits(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        return torch.cat([model(torch.tensor([i])).logits[0] for i in ids]), ids


def _safetensors(path) -> dict:
    """name -> (shape, dtype, file) of every tensor in a folder, and each file's metadata."""
    from safetensors import safe_open

    out, meta = {}, {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            meta[f.name] = st.metadata()
            for k in st.keys():
                out[k] = f.name
    return out, meta


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("dequantize", [False, True], ids=["from-quantized", "from-dequantized"])
def test_hf_export_matches_the_fused_mlx_model(export_runs, model_type, dequantize):
    import torch
    from mlx_lm.utils import load_tokenizer

    fcfg, fused = export_runs.fused(model_type, dequantize)
    reference = torch.from_numpy(np.array(mlx_logits(fused.path)))
    mlx_ids = [load_tokenizer(fused.path).encode(p) for p in PROMPTS]
    root, run = fused.path.parents[1], fused.path.parent
    dtypes = ["bfloat16", "float32"] if not dequantize else ["bfloat16"]
    for dtype in dtypes:
        result = convert_to_hf(make_cfg(root, run=fcfg.run, export__dtype=dtype, export__max_shard_gb=SHARD_GB))
        logits, ids = _hf_logits(result.path)
        assert ids == mlx_ids
        kl = _kl_per_token(reference, logits)
        top1 = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
        print(f"{model_type} {'dequantized' if dequantize else 'quantized'} fused -> HF {dtype}: "
              f"mean KL {kl:.3g} per token, top-1 {top1:.0%}, {len(result.shards)} shards")
        assert kl <= MAX_KL[dtype]

    # The checkpoint's own form: the base's tensor names, config and tokenizer files.
    names, meta = _safetensors(result.path)
    base_names, _ = _safetensors(run / "base")
    assert set(names) == set(base_names) - ({"lm_head.weight"} if fixture_config(model_type)["tie_word_embeddings"]
                                            else set())
    assert ("lm_head.weight" in names) == (not fixture_config(model_type)["tie_word_embeddings"])
    assert all(m == {"format": "pt"} for m in meta.values())
    assert len(meta) > 1
    index = json.loads((result.path / INDEX).read_text())
    assert index["weight_map"] == names
    assert 0.99 * result.size_bytes <= index["metadata"]["total_size"] <= result.size_bytes  # minus headers

    config = json.loads((result.path / "config.json").read_text())
    base_config = json.loads((run / "base" / "config.json").read_text())
    assert not {"quantization", "quantization_config", "rope_parameters"} & set(config)
    assert config["rope_theta"] == base_config["rope_theta"]
    assert {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")} == {
        k: v for k, v in base_config.items() if k not in ("torch_dtype", "dtype")}
    assert config["torch_dtype"] == dtypes[-1]
    if model_type == "granitemoehybrid":
        assert set(config["layer_types"]) == {"mamba", "attention"}
    for pattern in TOKENIZER_FILES:
        for f in (run / "base").glob(pattern):
            assert (result.path / f.name).read_bytes() == f.read_bytes(), f.name
    assert (result.path / "generation_config.json").is_file()


def _tiny_moe(tmp_path):
    """A tiny granitemoehybrid with experts (the fixtures are dense): mlx-lm renames its experts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(fixture_config("granitemoehybrid"), num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("model_type", ARCHS + ["granitemoehybrid-moe"])
def test_to_hf_weights_inverts_mlx_lm_sanitize(tiny_hf_model, tmp_path, model_type):
    """Hub checkpoint -> mlx-lm (sanitize renames) -> to_hf_weights gives back every tensor exactly."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    path = _tiny_moe(tmp_path) if model_type.endswith("-moe") else tiny_hf_model(model_type)
    hub = mx.load(str(path / "model.safetensors"))
    model, config = load_model(path)
    weights = arch.get(config["model_type"]).to_hf_weights(dict(tree_flatten(model.parameters())), config)
    tied = config.get("tie_word_embeddings", True)
    assert set(weights) == set(hub) - ({"lm_head.weight"} if tied else set())
    for k, v in weights.items():
        assert v.shape == hub[k].shape and mx.array_equal(v, hub[k]).item(), k


def test_cli_hf(export_runs, monkeypatch, tmp_path):
    for var in ("TEST_MODE", "RUN", "MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    fcfg, fused = export_runs.fused("llama", dequantize=True)
    root = fused.path.parents[1]
    r = CliRunner().invoke(cli.main, ["hf", "--models-dir", str(root), "--run", fcfg.run, "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    hf = fused.path.parent / "hf"
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "float16"
    assert json.loads((hf / "manifest.json").read_text())["inputs"]["fused"]["dequantized"] is True
    assert (hf / "model.safetensors").is_file() and not (hf / INDEX).exists()  # one shard below 5 GB

    r = CliRunner().invoke(cli.main, ["hf", "--models-dir", str(tmp_path), "--run", "none"])
    assert r.exit_code == 2
    assert "make fuse" in r.output and "Traceback" not in r.output
