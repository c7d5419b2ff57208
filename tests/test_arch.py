"""The architecture registry, and each registered architecture run for real on a tiny random model:
mlx-lm and transformers load it, they compute the same logits, and the CPU QLoRA form
(`dequantize_layers`) computes the same function as the quantized model."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from conftest import FIXTURE_CONFIGS, TINY_FIXTURES, TINY_MODEL_TYPES, fixture_config
from pipeline import arch
from pipeline.errors import PipelineError
from pipeline.modeling import dequantize_layers, load_model

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
        arch.get("gpt2")
    msg = str(e.value)
    assert "gpt2" in msg
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
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "shared_intermediate_size": 128,
        "position_embedding_type": "nope",
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


@pytest.mark.parametrize("name", TINY_FIXTURES)
def test_normalise_hub_form_is_a_no_op(name):
    cfg = fixture_config(name)
    before = json.loads(json.dumps(cfg))
    assert arch.normalise_config(cfg) == []
    assert cfg == before


@pytest.mark.parametrize("name", TINY_FIXTURES)
def test_normalise_what_transformers_writes(name, tmp_path):
    """Round trip: transformers 5 `save_pretrained` of the Hub config, normalised, gives it back."""
    from transformers import AutoConfig

    hub = fixture_config(name)
    AutoConfig.for_model(**hub).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    arch.normalise_config(cfg)
    assert "rope_parameters" not in cfg
    assert cfg["rope_theta"] == hub["rope_theta"]
    if "layer_types" in hub:
        assert cfg["layer_types"] == hub["layer_types"]
    scaling = fixture_config(name).get("rope_scaling")  # fresh: transformers edits the dict it is given
    if scaling:  # llama 3: rope_type llama3 and its factors survive the round trip
        assert {k: cfg["rope_scaling"][k] for k in scaling} == scaling
    else:
        assert "rope_scaling" not in cfg or not cfg["rope_scaling"]
    for key in ("num_local_experts", "num_experts_per_tok"):
        assert cfg.get(key) == hub.get(key), key


def test_normalise_dense_granite_hybrid_uses_no_experts():
    """transformers writes num_experts_per_tok 2 beside 0 experts; llama.cpp aborts on it."""
    base = {k: v for k, v in fixture_config("granitemoehybrid").items() if k != "num_experts_per_tok"}
    for used in (None, 2):
        cfg = dict(base, **({} if used is None else {"num_experts_per_tok": used}))
        changes = arch.normalise_config(cfg)
        assert cfg["num_experts_per_tok"] == 0 and len(changes) == 1 and "num_experts_per_tok = 0" in changes[0]
    with pytest.raises(PipelineError, match=r"num_experts_per_tok = 5 with num_local_experts = 4"):
        arch.normalise_config(dict(fixture_config("granitemoehybrid-moe"), num_experts_per_tok=5))


def test_gguf_arch_of_each_granite_shape():
    """llama.cpp writes an all-attention granitemoehybrid (Granite 4.0 Micro) as `granite`."""
    assert arch.gguf_arch_of(fixture_config("granitemoehybrid-micro")) == "granite"
    assert arch.gguf_arch_of(fixture_config("granitemoehybrid")) == "granitehybrid"
    assert arch.gguf_arch_of(fixture_config("granitemoehybrid-moe")) == "granitehybrid"
    assert arch.gguf_arch_of(fixture_config("llama-3")) == "llama"
    assert arch.from_gguf_arch("granite").model_type == "granite"


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


@pytest.mark.parametrize("model_type", TINY_FIXTURES)
def test_tiny_model_folder_is_hub_form(model_type, tiny_hf_model):
    folder = tiny_hf_model(model_type)
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg
    assert cfg["model_type"] == fixture_config(model_type)["model_type"]
    assert (folder / "tokenizer.json").is_file()
    assert list(folder.glob("*.safetensors"))


@pytest.mark.parametrize("model_type", TINY_FIXTURES)
def test_load_and_forward(model_type, loaded):
    model, tokenizer, config = loaded(model_type)
    cfg = fixture_config(model_type)
    assert config["model_type"] == cfg["model_type"]
    assert tokenizer.bos_token_id == cfg["bos_token_id"] and tokenizer.eos_token_id == cfg["eos_token_id"]
    assert len(model.layers) == cfg["num_hidden_layers"]
    logits = mlx_logits(model)
    assert logits.shape == (1, len(IDS), cfg["vocab_size"])
    assert np.isfinite(logits).all()
    assert logits.std() > 0.05, "degenerate random model: logits are nearly constant"
    assert ("lm_head" in dict(model.named_modules())) == (not cfg["tie_word_embeddings"])


@pytest.mark.parametrize("model_type", TINY_FIXTURES)
def test_presets_name_real_modules(model_type, loaded):
    """Every decoder layer has modules that each preset adapts (mlx-lm matches names per layer)."""
    model, _, config = loaded(model_type)
    a = arch.get(config["model_type"])
    for i, layer in enumerate(model.layers):
        names = {k for k, _ in layer.named_modules()}
        for preset, keys in a.presets.items():
            hit = [k for k in keys if k in names]
            assert hit, f"{model_type} layer {i}: preset '{preset}' matches none of {sorted(names)}"
            for k in hit:  # MoE experts: mlx-lm's SwitchLinear, which its LoRASwitchLinear adapts
                assert isinstance(dict(layer.named_modules())[k], (nn.Linear, SwitchLinear))


@pytest.mark.parametrize("model_type", TINY_FIXTURES)
def test_dequantized_equals_quantized(model_type, tiny_hf_model):
    """The CPU QLoRA path (dense layers holding the dequantized weights) computes the same
    function as the genuinely quantized model."""
    from mlx_lm.utils import quantize_model

    model, _, config = load_model(tiny_hf_model(model_type))
    dense = mlx_logits(model)
    model, _ = quantize_model(model, dict(config), group_size=32, bits=4)
    quantized_types = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    quantized_layers = [m for _, m in model.named_modules() if isinstance(m, quantized_types)]
    assert quantized_layers
    quantized = mlx_logits(model)
    assert np.abs(quantized - dense).max() > 1e-3, "4-bit quantization should change the logits"

    swapped = dequantize_layers(model, mx.float32)
    assert swapped == len(quantized_layers)
    assert not [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    diff = np.abs(mlx_logits(model) - quantized).max()
    assert diff < 1e-3, f"{model_type}: dequantized vs quantized max abs diff {diff}"


@pytest.mark.parametrize("model_type", TINY_FIXTURES)
def test_transformers_loads_and_matches_mlx(model_type, tiny_hf_model, loaded):
    """Parity: transformers (torch, float32) and mlx-lm (float32) on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_hf_model(model_type)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert hf.config.model_type == fixture_config(model_type)["model_type"]
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits.float().numpy()
    model, _, _ = loaded(model_type)
    got = mlx_logits(model)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff < PARITY_TOL, f"{model_type}: mlx-lm vs transformers max abs logit diff {diff}"
