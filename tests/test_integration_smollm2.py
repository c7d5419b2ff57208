"""The whole training half on the real SmolLM2-135M (embedded GGUF): base -> data -> quantize -> train.

A few QLoRA steps on the bundled task must lower the validation loss, and the adapter trained
against dequantized weights (the CPU path) must score the same loss on the genuinely 4-bit model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.phases.p01_prepare_data import prepare_data
from pipeline.phases.p02_fetch_base_model import fetch_base_model
from pipeline.phases.p03_quantize_base_model import quantize_base_model
from pipeline.phases.p04_train_lora import train_lora
from pipeline.phases.p05_evaluate import split_loss

pytestmark = pytest.mark.slow


def test_smollm2_qlora_loss_falls(tmp_path):
    cfg = load_config(None, {
        "models_dir": str(tmp_path), "run": "smol", "data.sample_rows": 120,
        "train.iters": 12, "train.num_layers": 4, "train.learning_rate": 5e-4,
        "train.steps_per_eval": 12, "train.steps_per_report": 4, "train.save_every": 12,
        "train.val_batches": 2,
    }, env={})
    base = fetch_base_model(cfg)
    config = json.loads((base.path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and "rope_parameters" not in config
    prepare_data(cfg)
    quantize_base_model(cfg)
    result = train_lora(cfg)
    assert result.final_val_loss < 0.7 * result.first_val_loss, (result.first_val_loss, result.final_val_loss)

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    from pipeline.modeling import cast_floats, load_model

    run = Path(cfg.models_dir) / "smol"
    rows = [json.loads(line) for line in (run / "data" / "valid.jsonl").read_text().splitlines()][:2]
    dense, tok, _ = load_model(run / "base-quantized", "float32")
    load_adapters(dense, str(run / "adapters"))
    quantized, _ = load(str(run / "base-quantized"))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.named_modules())
    cast_floats(quantized, mx.float32)
    load_adapters(quantized, str(run / "adapters"))
    a = split_loss(dense, tok, rows, 2, 512, "assistant")
    b = split_loss(quantized, tok, rows, 2, 512, "assistant")
    assert a == pytest.approx(b, rel=1e-3), (a, b)
