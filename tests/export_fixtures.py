"""Trained tiny runs shared by the export tests (07 fuse, 08 hf), built once per session.

`export_runs.trained(model_type)` takes a tiny random model through base -> data -> quantize
(4-bit, group 32) -> QLoRA train, with a learning rate high enough that the adapter changes the
logits a lot (so "the adapter survived fusing" can be measured). `export_runs.fused(model_type,
dequantize, dtype)` copies that run under its own run name and fuses it there, so every fuse
mode keeps its own output. tests/conftest.py registers the `export_runs` fixture for every module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config

EXPORT_TRAIN = {
    "data.sample_rows": 40, "train.iters": 8, "train.learning_rate": 1e-2, "train.batch_size": 2,
    "train.num_layers": -1, "train.steps_per_eval": 100, "train.steps_per_report": 4,
    "train.save_every": 100, "train.val_batches": 1, "quantize.group_size": 32,
}
PROMPTS = ["Ken wants 2 red lamps shipped to Oslo.", "The capital of France is", '{"item": "lamp", "qty": 3}']
ARCHS = ["llama", "granite", "granitemoehybrid"]

_TRAINED: dict[str, Path] = {}
_FUSED: dict[tuple, tuple] = {}
_REFERENCE: dict[str, tuple] = {}


def make_cfg(models_dir, source="unused", run="t", **keys):
    values = {"models_dir": str(models_dir), "run": run, "model.source": str(source), **EXPORT_TRAIN}
    values.update({k.replace("__", "."): v for k, v in keys.items()})
    return load_config(None, values, env={})


def copy_run(models_dir: Path, run: str) -> Path:
    """A copy of the trained run `t` (base, data, quantized base, adapter) as run `run`."""
    dst = models_dir / run
    if not dst.exists():
        shutil.copytree(models_dir / "t", dst, ignore=shutil.ignore_patterns("fused", "hf", "checkpoints"))
    return dst


def shrink_adapter(run: Path, factor: float = 1e-3) -> Path:
    """Scale run's trained adapter (lora_b) by `factor`, re-recording it in the adapter's manifest
    as if training had produced it (phases refuse an adapter edited behind its manifest). Both the
    last step's (adapters/) and the best one (adapters/best/, which 05-10 use by default) when kept."""
    import mlx.core as mx

    from pipeline.fsio import sha256_file

    manifest_path = run / "adapters" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key, path in (("adapter_file", run / "adapters" / "adapters.safetensors"),
                      ("best", run / "adapters" / "best" / "adapters.safetensors")):
        if key not in manifest["outputs"] or not path.is_file():
            continue
        weights = {k: v * factor if k.endswith("lora_b") else v for k, v in mx.load(str(path)).items()}
        mx.save_safetensors(str(path), weights)
        manifest["outputs"][key]["sha256"] = sha256_file(path)
    manifest.pop("file_stats", None)
    manifest_path.write_text(json.dumps(manifest))
    return run


class ExportRuns:
    def __init__(self, tmp_path_factory, tiny_hf_model):
        self.tmp_path_factory = tmp_path_factory
        self.tiny_hf_model = tiny_hf_model

    def trained(self, model_type: str) -> Path:
        """Output dir holding run 't' trained on `model_type` (QLoRA, 4-bit group 32)."""
        from pipeline.phases.p01_prepare_data import prepare_data
        from pipeline.phases.p02_fetch_base_model import fetch_base_model
        from pipeline.phases.p03_quantize_base_model import quantize_base_model
        from pipeline.phases.p04_train_lora import train_lora

        if model_type not in _TRAINED:
            root = self.tmp_path_factory.mktemp(f"export-{model_type}")
            cfg = make_cfg(root, self.tiny_hf_model(model_type))
            fetch_base_model(cfg)
            prepare_data(cfg)
            quantize_base_model(cfg)
            train_lora(cfg)
            _TRAINED[model_type] = root
        return _TRAINED[model_type]

    def reference(self, model_type: str):
        """Float32 logits of the quantized base alone and with the adapter loaded (mlx-lm's layers)."""
        if model_type not in _REFERENCE:
            run = self.trained(model_type) / "t"
            _REFERENCE[model_type] = (mlx_logits(run / "base-quantized"),
                                      mlx_logits(run / "base-quantized", run / "adapters"))
        return _REFERENCE[model_type]

    def fused(self, model_type: str, dequantize: bool, dtype: str = "bfloat16"):
        """(cfg, FuseResult) of the trained run fused in this mode, in a run of its own."""
        from pipeline.phases.p07_fuse_lora import fuse

        key = (model_type, dequantize, dtype)
        if key not in _FUSED:
            root = self.trained(model_type)
            run = f"deq-{dtype}" if dequantize else "q"
            copy_run(root, run)
            cfg = make_cfg(root, run=run, fuse__dequantize=dequantize, fuse__dtype=dtype)
            _FUSED[key] = (cfg, fuse(cfg))
        return _FUSED[key]


@pytest.fixture(scope="session")
def export_runs(tmp_path_factory, tiny_hf_model) -> ExportRuns:
    return ExportRuns(tmp_path_factory, tiny_hf_model)


def mlx_logits(model_dir, adapter_dir=None, fuse_with_mlx_lm=False):
    """Logits of PROMPTS (concatenated over positions) in float32, on the genuine MLX model.

    float32 because MLX's CPU quantized matmul is inaccurate in bf16 (PLATFORM_NOTES).
    `fuse_with_mlx_lm`: fuse the adapter the way mlx-lm's own `mlx_lm fuse` does (the reference).
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load

    from pipeline.modeling import cast_floats

    model, tok = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    if fuse_with_mlx_lm:
        layers = [(n, m.fuse(dequantize=False)) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(layers))
    cast_floats(model, mx.float32)
    out = mx.concatenate([model(mx.array(tok.encode(p))[None])[0] for p in PROMPTS])
    mx.eval(out)
    return out


def max_abs(a, b) -> float:
    import mlx.core as mx

    return mx.abs(a - b).max().item()


def rms(a, b) -> float:
    import mlx.core as mx

    return mx.sqrt(((a - b) ** 2).mean()).item()
