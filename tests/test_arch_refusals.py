"""What the registry refuses or rewrites for qwen/gemma3/phi3/mistral configs, and the message a user
gets for an architecture it does not know. Config dicts only (no model is built): the architectures
themselves are run for real by test_arch.py and test_chain_per_arch.py over their fixtures."""

from __future__ import annotations

import pytest

from conftest import fixture_config
from pipeline import arch
from pipeline.errors import PipelineError


def test_unsupported_message_uses_the_configs_names():
    with pytest.raises(PipelineError) as e:
        arch.normalise_config({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    msg = str(e.value)
    assert "'gpt_neox'" in msg and "GPTNeoXForCausalLM" in msg
    assert all(t in msg for t in arch.supported())
    assert "CONTRIBUTING.md" in msg


def test_multimodal_gemma3_is_refused_naming_gemma3_text():
    with pytest.raises(PipelineError) as e:
        arch.normalise_config({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    assert "gemma3_text" in str(e.value) and "gemma-3-1b-it" in str(e.value)


def test_mistral_ggufs_are_llama():
    assert arch.get("mistral").gguf_arch == "llama"
    assert arch.from_gguf_arch("llama").model_type == "llama"


def _gemma(**changes) -> dict:
    cfg = fixture_config("gemma3_text")
    cfg.update(changes)
    return cfg


def test_gemma3_transformers5_form():
    cfg = _gemma(rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
                 layer_types=["sliding_attention"] * 5 + ["full_attention"])
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
        cfg.pop(key)
    changes = arch.normalise_config(cfg)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["sliding_window_pattern"]) == (1e6, 1e4, 6)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert "rope_parameters" not in cfg and len(changes) == 5


@pytest.mark.parametrize("changes, key", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"sliding_window_pattern": 2}, "sliding_window_pattern"),
    ({"num_hidden_layers": 4}, "num_hidden_layers"),
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
    ({"sliding_window_pattern": None, "layer_types": ["full_attention"] + ["sliding_attention"] * 5}, "layer_types"),
])
def test_gemma3_refuses_what_a_tool_computes_differently(changes, key):
    with pytest.raises(PipelineError, match=key):
        arch.normalise_config(_gemma(**changes))


def _phi3(rope_scaling) -> dict:
    return {"model_type": "phi3", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0, "rope_scaling": rope_scaling}


def test_phi3_longrope_with_two_factor_sets_is_refused_with_the_fix():
    with pytest.raises(PipelineError) as e:
        arch.normalise_config(_phi3({"type": "longrope", "short_factor": [1.0, 1.1], "long_factor": [1.0, 9.0]}))
    assert "short_factor" in str(e.value) and "long_factor" in str(e.value) and "4096" in str(e.value)
    same = _phi3({"type": "longrope", "short_factor": [1.0, 1.1], "long_factor": [1.0, 1.1]})
    assert arch.normalise_config(same) == []


def test_phi3_transformers5_form():
    cfg = {"model_type": "phi3", "max_position_embeddings": 131072, "rope_parameters": {
        "rope_theta": 10000.0, "rope_type": "longrope", "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 4096, "short_factor": [1.0, 2.0], "long_factor": [1.0, 2.0]}}
    arch.normalise_config(cfg)
    assert cfg["partial_rotary_factor"] == 0.75 and cfg["original_max_position_embeddings"] == 4096
    assert cfg["rope_theta"] == 10000.0 and "rope_parameters" not in cfg
    assert cfg["rope_scaling"] == {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [1.0, 2.0]}


def test_phi3_scaling_mlx_lm_would_drop_is_refused():
    with pytest.raises(PipelineError, match="yarn"):
        arch.normalise_config(_phi3({"type": "yarn", "factor": 4.0}))


def test_hybrid_granite_with_rope_is_refused():
    """llama.cpp's converter writes no RoPE for a model with mamba layers: a `rope` hybrid config
    would export to a GGUF computing another function, so 02 refuses it, naming the key."""
    cfg = {"model_type": "granitemoehybrid", "layer_types": ["mamba", "attention"], "num_local_experts": 0,
           "num_experts_per_tok": 0, "shared_intermediate_size": 128, "position_embedding_type": "rope"}
    with pytest.raises(PipelineError, match="position_embedding_type.*nope"):
        arch.normalise_config(cfg)
    del cfg["position_embedding_type"]  # mlx-lm's default is rope
    with pytest.raises(PipelineError, match="position_embedding_type"):
        arch.normalise_config(cfg)
    cfg["position_embedding_type"] = "nope"
    assert arch.normalise_config(cfg) == []
    micro = {**cfg, "layer_types": ["attention", "attention"], "position_embedding_type": "rope"}
    assert arch.normalise_config(micro) == []  # all attention (Micro): converted as granite, with RoPE
