"""The real SmolLM2-135M taken through the whole chain once per session: what a user ships.

`shipped_run` runs, with the phase functions themselves: 02 base (the embedded GGUF) -> 01 data
(the bundled JSON task) -> 03 quantize (4-bit) -> 04 train (QLoRA, the demo's settings, few steps)
-> 07 fuse --de-quantize -> 08 hf -> 09 gguf (F16, Q8_0, and the F16 base + LoRA GGUF pair) ->
10 verify. Only as much as the adapter needs to learn the task (>= 90 % JSON match): the demo's
learning rate, batch and layers, far fewer steps, 20 answered test rows. tests/conftest.py
registers the fixture for every module; it returns a `ShippedRun` (cfg, verify report, timings).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.config import load_config

SHIPPED = {
    "run": "ship",
    "data.sample_rows": 200,  # 160 train / 20 valid / 20 test: every test row is answered by verify
    # The demo's training settings (configs/default.yaml), fewer steps (45: just over one epoch of the 160
    # rows): 90 % JSON match measured; 30 steps gave 70-75 %, below the tests' 80 %.
    "train.num_layers": 8, "train.learning_rate": 2e-4, "train.batch_size": 4, "train.iters": 45,
    "train.steps_per_report": 10, "train.steps_per_eval": 1000, "train.val_batches": 1, "train.save_every": 1000,
    "fuse.dequantize": True,
    "gguf.quantizations": ["Q8_0"], "gguf.adapter_gguf": True, "gguf.imatrix": False, "gguf.native": False,
    "verify.max_rows": 4, "verify.max_samples": 20,
}


@dataclass
class ShippedRun:
    cfg: object
    report: dict  # verify/report.json
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall time

    @property
    def root(self) -> Path:
        return Path(self.cfg.models_dir) / self.cfg.run

    def row(self, type_name: str) -> dict:
        """The verify report row of an export, by the key --type matches (Q8_0, F16+LORA, ...)."""
        from pipeline.export_choice import type_key

        rows = [r for r in self.report["models"] if not r["file"].endswith("(MLX)")]
        return next(r for r in rows if type_key(r) == type_name)

    def metric(self, type_name: str) -> float:
        return self.row(type_name)["metric"][self.report["primary_metric"]]

    def answered_rows(self) -> list[dict]:
        """The test rows 10 verify answered (the first rows_answered chat rows of the test split)."""
        lines = (self.root / "data" / "test.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return [r for r in rows if "messages" in r or "prompt" in r][: self.report["rows_answered"]]


def build_shipped_run(models_dir: Path, **overrides) -> ShippedRun:
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    from pipeline.phases.p03_quantize_base_model import quantize_base_model
    from pipeline.phases.p04_train_lora import train_lora
    from pipeline.phases.p07_fuse_lora import fuse
    from pipeline.phases.p08_convert_to_hf import convert_to_hf
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf
    from pipeline.phases.p10_verify_gguf import verify_gguf

    cfg = load_config(None, {"models_dir": str(models_dir), **SHIPPED, **overrides}, env={})
    seconds = {}
    # 02 before 01: phase 01 counts tokens with the base model's tokenizer.
    for name, phase in [("02 base", fetch_base_model), ("01 data", prepare_data), ("03 quantize", quantize_base_model),
                        ("04 train", train_lora), ("07 fuse", fuse), ("08 hf", convert_to_hf),
                        ("09 gguf", convert_to_gguf), ("10 verify", verify_gguf)]:
        t0 = time.time()
        phase(cfg)
        seconds[name] = round(time.time() - t0, 1)
    seconds["total"] = round(sum(seconds.values()), 1)
    report = json.loads((Path(models_dir) / cfg.run / "verify" / "report.json").read_text())
    print(f"\nshipped_run phase times (s): {seconds}")
    return ShippedRun(cfg, report, seconds)


@pytest.fixture(scope="session")
def shipped_run(tmp_path_factory) -> ShippedRun:
    return build_shipped_run(tmp_path_factory.mktemp("shipped"))
