"""The architecture registry, and each registered architecture run for real on a tiny random model:
mlx-lm and transformers load it, they compute the same logits, and the CPU QLoRA form
(`dequantize_layers`) computes the same function as the quantized model."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from pipeline import arch
from pipeline.errors import PipelineError
from pipeline.modeling import dequantize_layers, load_model

from conftest import FIXTURE_CONFIGS, TINY_MODEL_TYPES, fixture_config

# Token ids of the SmolLM2 vocabulary, including bos/eos and the last id.
IDS = [1, 504, 3458, 282, 4649, 314, 2114, 47, 2, 9000, 49151, 17]
PARITY_TOL = 1e-4  # measured ~3e-6 (llama), ~5e-7 (granite, granitemoehybrid)


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", arch.supported())
def test_get_each_supported(model_type):
    a = arch.get(model_type)
    assert a.model_type == model_type
    assert a.presets["attention"] and a.presets["mlp"]
    module = __import__(f"pipeline.arch.{model_type}", fromlist=["ARCH"])
    assert module.__doc__, f"pipeline/arch/{model_type}.py needs a docstring listing its differences"


def test_every_supported_type_has_a_fixture():
    assert set(arch.supported()) == set(TINY_MODEL_TYPES), (
        f"fixtures in {FIXTURE_CONFIGS} must match the registry"
    )


def test_unknown_type_lists_supported():
    with pytest.raises(PipelineError) as e:
        arch.get("mistral")
    msg = str(e.value)
    assert "mistral" in msg
    for t in arch.supported():
        assert t in msg


def test_normalise_config_without_model_type():
    with pytest.raises(PipelineError, match="model_type"):
        arch.normalise_config({"hidden_size": 64})


def test_normalise_unknown_type():
    with pytest.raises(PipelineError, match="llama"):
        arch.normalise_config({"model_type": "gpt2"})


def test_normalise_transformers5_form_by_hand():
    cfg = {
        "model_type": "granitemoehybrid",
        "rope_parameters": {"rope_theta": 10000, "rope_type": "default"},
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        "dtype": "bfloat16",
    }
    changes = arch.normalise_config(cfg)
    assert cfg["rope_theta"] == 10000
    assert "rope_parameters" not in cfg
    assert "rope_scaling" not in cfg
    assert cfg["layer_types"] == ["mamba", "attention", "mamba"]
    assert cfg["torch_dtype"] == "bfloat16"
    assert changes


def test_normalise_keeps_rope_scaling():
    cfg = {
        "model_type": "llama",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
    }
    arch.normalise_config(cfg)
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["factor"] == 32.0
    assert "rope_theta" not in cfg["rope_scaling"]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_normalise_hub_form_is_a_no_op(model_type):
    cfg = fixture_config(model_type)
    before = json.loads(json.dumps(cfg))
    assert arch.normalise_config(cfg) == []
    assert cfg == before


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_normalise_what_transformers_writes(model_type, tmp_path):
    """Round trip: transformers 5 `save_pretrained` of the Hub config, normalised, gives it back."""
    from transformers import AutoConfig

    hub = fixture_config(model_type)
    AutoConfig.for_model(**hub).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    arch.normalise_config(cfg)
    assert "rope_parameters" not in cfg
    assert cfg["rope_theta"] == hub["rope_theta"]
    if "layer_types" in hub:
        assert cfg["layer_types"] == hub["layer_types"]
    assert "rope_scaling" not in cfg or not cfg["rope_scaling"]


def test_resolve_targets_presets():
    att = arch.resolve_targets("llama", ["attention"])
    assert att == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    both = arch.resolve_targets("llama", ["attention", "mlp", "lm_head"])
    assert both == att + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"]
    hybrid = arch.resolve_targets("granitemoehybrid", ["attention"])
    assert "mamba.in_proj" in hybrid and "self_attn.q_proj" in hybrid


def test_resolve_targets_explicit_names_and_dedup():
    keys = arch.resolve_targets("granite", ["self_attn.q_proj", "attention", "v_proj", "mlp.down_proj"])
    assert keys[0] == "self_attn.q_proj"
    assert keys.count("self_attn.q_proj") == 1
    assert "v_proj" in keys and "mlp.down_proj" in keys


def test_resolve_targets_unknown():
    with pytest.raises(PipelineError) as e:
        arch.resolve_targets("llama", ["attention", "everything"])
    msg = str(e.value)
    assert "everything" in msg
    for preset in ("attention", "mlp", "lm_head"):
        assert preset in msg


def test_resolve_targets_unknown_type():
    with pytest.raises(PipelineError, match="Supported"):
        arch.resolve_targets("gpt2", ["attention"])


# --- tiny models ------------------------------------------------------------------------------


def mlx_logits(model) -> np.ndarray:
    out = model(mx.array([IDS]))
    return np.array(out.astype(mx.float32))


@pytest.fixture(scope="module")
def loaded(tiny_hf_model):
    """model_type -> (model, tokenizer, config) from `pipeline.modeling.load_model`, cached."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = load_model(tiny_hf_model(model_type))
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_tiny_model_folder_is_hub_form(model_type, tiny_hf_model):
    folder = tiny_hf_model(model_type)
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg
    assert cfg["model_type"] == model_type
    assert (folder / "tokenizer.json").is_file()
    assert list(folder.glob("*.safetensors"))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_load_and_forward(model_type, loaded):
    model, tokenizer, config = loaded(model_type)
    cfg = fixture_config(model_type)
    assert config["model_type"] == model_type
    assert tokenizer.bos_token_id == cfg["bos_token_id"] and tokenizer.eos_token_id == cfg["eos_token_id"]
    assert len(model.layers) == cfg["num_hidden_layers"]
    logits = mlx_logits(model)
    assert logits.shape == (1, len(IDS), cfg["vocab_size"])
    assert np.isfinite(logits).all()
    assert logits.std() > 0.05, "degenerate random model: logits are nearly constant"
    assert ("lm_head" in dict(model.named_modules())) == (not cfg["tie_word_embeddings"])


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_presets_name_real_modules(model_type, loaded):
    """Every decoder layer has modules that each preset adapts (mlx-lm matches names per layer)."""
    model, _, _ = loaded(model_type)
    a = arch.get(model_type)
    for i, layer in enumerate(model.layers):
        names = {k for k, _ in layer.named_modules()}
        for preset, keys in a.presets.items():
            hit = [k for k in keys if k in names]
            assert hit, f"{model_type} layer {i}: preset '{preset}' matches none of {sorted(names)}"
            for k in hit:
                assert isinstance(dict(layer.named_modules())[k], nn.Linear)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_dequantized_equals_quantized(model_type, tiny_hf_model):
    """The CPU QLoRA path (dense layers holding the dequantized weights) computes the same
    function as the genuinely quantized model."""
    from mlx_lm.utils import quantize_model

    model, _, config = load_model(tiny_hf_model(model_type))
    dense = mlx_logits(model)
    model, _ = quantize_model(model, dict(config), group_size=32, bits=4)
    quantized_layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized_layers
    quantized = mlx_logits(model)
    assert np.abs(quantized - dense).max() > 1e-3, "4-bit quantization should change the logits"

    swapped = dequantize_layers(model, mx.float32)
    assert swapped == len(quantized_layers)
    assert not [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    diff = np.abs(mlx_logits(model) - quantized).max()
    assert diff < 1e-3, f"{model_type}: dequantized vs quantized max abs diff {diff}"


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_transformers_loads_and_matches_mlx(model_type, tiny_hf_model, loaded):
    """Parity: transformers (torch, float32) and mlx-lm (float32) on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_hf_model(model_type)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert hf.config.model_type == model_type
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits.float().numpy()
    model, _, _ = loaded(model_type)
    got = mlx_logits(model)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff < PARITY_TOL, f"{model_type}: mlx-lm vs transformers max abs logit diff {diff}"
