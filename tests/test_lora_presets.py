"""bench/lora_presets.py: its counts on a tiny model against the LoRA shapes worked out independently.

The expected trainable count comes from the Hugging Face checkpoint's own tensor shapes (the
safetensors header): every targeted linear W of shape (out, in) gets A (in x r) and B (r x out).
"""

from __future__ import annotations

import json
import math
import struct

import pytest

from bench import lora_presets

# Hugging Face module names per preset for a llama checkpoint (independent of pipeline.arch).
HF_MODULES = {
    "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def _shapes(model_dir) -> dict[str, list[int]]:
    shapes = {}
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _expected_trainable(shapes: dict, targets: list[str], rank: int, layers: list[int]) -> int:
    names = [f"model.layers.{i}.{m}.weight" for i in layers for t in targets if t != "lm_head" for m in HF_MODULES[t]]
    if "lm_head" in targets:
        names.append("lm_head.weight")
    return sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)


@pytest.mark.parametrize("preset", list(lora_presets.PRESETS))
@pytest.mark.parametrize("rank,num_layers", [(8, -1), (4, 1)])
def test_preset_counts_match_the_lora_shapes(tiny_hf_model, preset, rank, num_layers):
    model_dir = tiny_hf_model("llama-3")  # untied: has an lm_head
    config = json.loads((model_dir / "config.json").read_text())
    shapes = _shapes(model_dir)
    base = sum(math.prod(s) for s in shapes.values())
    n = config["num_hidden_layers"]
    layers = list(range(n))[-num_layers:] if num_layers != -1 else list(range(n))

    got = lora_presets.count(config, lora_presets.PRESETS[preset], rank, num_layers)

    assert got["total"] == got["trainable"] + got["frozen"]
    assert got["frozen"] == base  # LoRA freezes exactly the base model
    assert got["trainable"] == _expected_trainable(shapes, lora_presets.PRESETS[preset], rank, layers) > 0
    printed = got["count_parameters"]  # what 04 prints
    keys = ("total", "trainable", "frozen")
    assert [printed[k] for k in keys] == [got[k] for k in keys]
    assert got["layers"] == len(layers)


def test_lm_head_preset_refused_on_a_tied_model(tiny_hf_model):
    from pipeline.errors import PipelineError

    config = json.loads((tiny_hf_model("llama") / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with pytest.raises(PipelineError, match="lm_head"):
        lora_presets.count(config, lora_presets.PRESETS["attention,mlp,lm_head"], 8)
