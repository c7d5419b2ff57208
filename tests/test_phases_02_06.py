"""Phases 02-06 on tiny random models of every architecture: real mlx-lm, real transformers."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import MissingInputError, PipelineError
from pipeline.phases.p01_prepare_data import prepare_data
from pipeline.phases.p02_fetch_base_model import fetch_base_model
from pipeline.phases.p03_quantize_base_model import quantize_base_model
from pipeline.phases.p04_train_lora import train_lora
from pipeline.phases.p05_evaluate import evaluate, split_loss
from pipeline.phases.p06_generate import generate

FAST_TRAIN = {
    "data.sample_rows": 40, "train.iters": 4, "train.steps_per_eval": 2, "train.steps_per_report": 2,
    "train.save_every": 2, "train.val_batches": 1, "train.batch_size": 2, "train.num_layers": -1,
    "train.learning_rate": 1e-3, "eval.max_samples": 2, "eval.max_tokens": 8, "eval.show_samples": 1,
    "quantize.group_size": 32,
}


def make_cfg(tmp_path, source, **keys):
    values = {"models_dir": str(tmp_path), "run": "t", "model.source": str(source), **FAST_TRAIN}
    values.update({k.replace("__", "."): v for k, v in keys.items()})
    return load_config(None, values, env={})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_hf_model):
    """Each architecture through base -> data -> quantize -> train (QLoRA), once per module."""
    runs = {}

    def get(model_type):
        if model_type not in runs:
            root = tmp_path_factory.mktemp(f"run-{model_type}")
            cfg = make_cfg(root, tiny_hf_model(model_type))
            fetch_base_model(cfg)
            prepare_data(cfg)
            quantize_base_model(cfg)
            runs[model_type] = (cfg, train_lora(cfg))
        return runs[model_type]

    return get


@pytest.mark.parametrize("model_type", ["llama", "granite", "granitemoehybrid"])
def test_qlora_chain_per_architecture(trained, model_type):
    cfg, result = trained(model_type)
    out = Path(cfg.models_dir) / "t"
    adapter_cfg = json.loads((out / "adapters" / "adapter_config.json").read_text())
    base_manifest = json.loads((out / "base-quantized" / "manifest.json").read_text())
    # The adapter records the identity of the base it was trained on.
    assert adapter_cfg["base_model"]["content_hash"] == base_manifest["outputs"]["content_hash"]
    assert adapter_cfg["base_model"]["quantization"]["bits"] == 4
    assert adapter_cfg["lora_parameters"]["scale"] == pytest.approx(16.0 / 8)
    log = [json.loads(line) for line in (out / "adapters" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_loss" in r] == [2, 4]
    assert all(math.isfinite(r.get("train_loss", 0)) for r in log)
    assert (out / "adapters" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "adapters" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in (out / "adapters" / "checkpoints" / "step-0000004").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "manifest.json", "optimizer.safetensors", "state.json"]
    assert not (out / ".adapters.partial").exists()
    assert 0 < result.parameters["trainable"] < result.parameters["total"]
    assert result.parameters["total"] == result.parameters["trainable"] + result.parameters["frozen"]


def test_cpu_dequantized_training_matches_the_quantized_model(trained):
    """The adapter trained against dequantized weights gives the same loss on the real 4-bit model."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    from pipeline.modeling import cast_floats, load_model

    cfg, _ = trained("llama")
    out = Path(cfg.models_dir) / "t"
    rows = [json.loads(line) for line in (out / "data" / "valid.jsonl").read_text().splitlines()]
    dense, tok, _ = load_model(out / "base-quantized", "float32")
    load_adapters(dense, str(out / "adapters"))
    quantized, _ = load(str(out / "base-quantized"))  # genuinely quantized: QuantizedLinear layers
    import mlx.nn as nn

    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.named_modules())
    cast_floats(quantized, mx.float32)
    load_adapters(quantized, str(out / "adapters"))
    loss_dense = split_loss(dense, tok, rows, 2, 512, "assistant")
    loss_quant = split_loss(quantized, tok, rows, 2, 512, "assistant")
    assert loss_dense == pytest.approx(loss_quant, rel=1e-4, abs=1e-5)


def test_evaluate_and_generate(trained):
    cfg, _ = trained("llama")
    result = evaluate(cfg)
    report = json.loads((result.path / "results.json").read_text())
    assert report["primary_metric"] == "json_match"
    for k in ("base", "adapter"):
        assert report[k]["test_loss"] > 0 and report[k]["perplexity"] == pytest.approx(
            math.exp(report[k]["test_loss"]), rel=1e-2)
        assert report[k]["metric"]["n"] == 2
    assert "| base + adapter |" in (result.path / "results.md").read_text()
    assert len(report["samples"]) == 1
    text = generate(cfg, prompt="Ken ordered 2 red lamps for Oslo.")
    assert isinstance(text, str)


def test_resume_continues_from_the_newest_checkpoint(trained, tmp_path):
    cfg, _ = trained("granite")
    run = Path(cfg.models_dir) / "t"
    partial = run / ".adapters.partial"
    shutil.copytree(run / "adapters", partial)
    shutil.rmtree(partial / "checkpoints" / "step-0000004")
    resumed = load_config(None, {**cfg_values(cfg), "train.iters": 6}, env={})
    train_lora(resumed, resume=True)
    manifest = json.loads((run / "adapters" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 2
    log = [json.loads(line) for line in (run / "adapters" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_loss" in r][-2:] == [4, 6]


def cfg_values(cfg) -> dict:
    from pipeline.config import KEYS

    return {k: cfg.get(k) for k in KEYS}


def test_dora_and_full_fine_tuning(tiny_hf_model, tmp_path):
    cfg = make_cfg(tmp_path, tiny_hf_model("llama"), train__fine_tune_type="dora")
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    assert train_lora(cfg).parameters["trainable"] > 0
    full = make_cfg(tmp_path, tiny_hf_model("llama"), train__fine_tune_type="full")
    with pytest.raises(PipelineError, match="cannot run on a quantized base"):
        train_lora(full)
    full = make_cfg(tmp_path, tiny_hf_model("llama"), train__fine_tune_type="full",
                    quantize__enabled=False, train__num_layers=1)
    r = train_lora(full)
    assert r.parameters["trainable"] > 10_000
    assert json.loads((tmp_path / "t" / "adapters" / "adapter_config.json").read_text())["fine_tune_type"] == "full"


def test_targets_lm_head_and_errors(tiny_hf_model, tmp_path):
    cfg = make_cfg(tmp_path, tiny_hf_model("granite"), train__targets="lm_head,self_attn.q_proj")
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    train_lora(cfg)
    weights = json.loads((tmp_path / "t" / "adapters" / "adapter_config.json").read_text())
    assert weights["lora_parameters"]["keys"] == ["lm_head", "self_attn.q_proj"]
    bad = make_cfg(tmp_path, tiny_hf_model("granite"), train__targets="self_attn.nope_proj")
    with pytest.raises(PipelineError, match="not found in this model"):
        train_lora(bad)
    with pytest.raises(PipelineError, match="Unknown LoRA target 'everything'"):
        train_lora(make_cfg(tmp_path, tiny_hf_model("granite"), train__targets="everything"))


def test_base_normalises_a_transformers5_config(tiny_hf_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    (src / "config.json").write_text(json.dumps(config))
    cfg = make_cfg(tmp_path, src)
    result = fetch_base_model(cfg)
    written = json.loads((result.path / "config.json").read_text())
    assert written["rope_theta"] == 100000.0 and "rope_parameters" not in written
    assert any("rope_theta" in c for c in result.config_changes)


def test_quantize_reports_sizes(trained):
    cfg, _ = trained("llama")
    manifest = json.loads((Path(cfg.models_dir) / "t" / "base-quantized" / "manifest.json").read_text())
    report = manifest["report"]
    assert report["size_after"] < report["size_before"] / 3
    # 4-bit values + fp32 scale and bias per 32 weights = 6 bits; the unquantized norms add a little.
    assert 4.0 < report["bits_per_weight"] < 8.0


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "missing", "neither an existing folder"),
    (lambda p: (p / "nocfg").mkdir() or p / "nocfg", "no config.json"),
    (lambda p: _pickle_only(p), "pickle checkpoints are not loaded"),
    (lambda p: _corrupt_gguf(p), "not a readable GGUF"),
    (lambda p: p / "missing.gguf", "GGUF file not found"),
])
def test_base_bad_sources(tmp_path, setup, match):
    cfg = make_cfg(tmp_path, setup(tmp_path))
    with pytest.raises((PipelineError, MissingInputError), match=match):
        fetch_base_model(cfg)
    assert not (tmp_path / "t" / "base").exists()


def _pickle_only(p: Path) -> Path:
    d = p / "pickled"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return d


def _corrupt_gguf(p: Path) -> Path:
    f = p / "broken.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    return f


def test_hub_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    cfg = make_cfg(tmp_path, "nobody/no-such-model", model__revision="main")
    with pytest.raises(MissingInputError, match="not in the local Hugging Face cache"):
        fetch_base_model(cfg)


def test_phases_name_the_missing_step(tmp_path):
    cfg = make_cfg(tmp_path, "embedded:smollm2")
    for fn, target in ((quantize_base_model, "make base"), (train_lora, "make data"), (evaluate, "make data")):
        with pytest.raises(MissingInputError, match=target):
            fn(cfg)


def test_cli_train_without_data_exits_2(tmp_path, monkeypatch):
    for var in ("TEST_MODE", "LORA_RANK", "RUN", "MODELS_DIR", "USE_LORA"):
        monkeypatch.delenv(var, raising=False)
    r = CliRunner().invoke(cli.main, ["train", "--models-dir", str(tmp_path), "--run", "x"])
    assert r.exit_code == 2
    assert "make data" in r.output and "Traceback" not in r.output


def test_scripts_run_their_phase(tmp_path):
    """The numbered scripts are the same commands: --help works and names the phase."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    scripts = sorted(root.glob("scripts/phase*/[0-9][0-9]_*.py"))
    assert len(scripts) >= 6
    for s in scripts:
        r = subprocess.run([sys.executable, str(s), "--help"], capture_output=True, text=True, cwd=root,
                           env={"PATH": "/usr/bin:/bin", "MLX_PIPELINE_NO_REEXEC": "1"})
        assert r.returncode == 0, r.stderr
        assert s.name[:2] in r.stdout, f"{s.name}: --help does not name its phase number"
        assert s.read_text().startswith(f'"""python scripts/{s.parent.name}/{s.name}')


def test_cli_runs_eval_and_generate(trained, monkeypatch):
    for var in ("TEST_MODE", "LORA_RANK", "RUN", "MODELS_DIR", "USE_LORA", "QUANTIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg, _ = trained("granitemoehybrid")
    common = ["--models-dir", cfg.models_dir, "--run", "t"]
    r = CliRunner().invoke(cli.main, ["eval", *common, "--max-samples", "2", "--max-tokens", "4", "--skip-base"])
    assert r.exit_code == 0, r.output
    assert "base + adapter" in r.output
    r = CliRunner().invoke(cli.main, ["generate", *common, "--prompt", "hi", "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli.main, ["generate", *common, "--max-tokens", "3"], input="hello\n/reset\n\n")
    assert r.exit_code == 0 and "Interactive chat" in r.output, r.output


def test_generate_without_adapter_names_train(tiny_hf_model, tmp_path):
    cfg = make_cfg(tmp_path, tiny_hf_model("llama"))
    fetch_base_model(cfg)
    quantize_base_model(cfg)
    with pytest.raises(MissingInputError, match="make train"):
        generate(cfg, prompt="hi")
    assert isinstance(generate(cfg, prompt="hi", use_adapter=False), str)


def test_quantize_corrupt_weights_fails_clearly(tiny_hf_model, tmp_path):
    cfg = make_cfg(tmp_path, tiny_hf_model("llama"))
    fetch_base_model(cfg)
    weights = tmp_path / "t" / "base" / "model.safetensors"
    # damaged by a new file under the name: base/'s weights are hard links to the shared fixture's
    cut = weights.with_suffix(".cut")
    cut.write_bytes(weights.read_bytes()[:1000])
    os.replace(cut, weights)
    with pytest.raises(PipelineError, match="model.safetensors"):
        quantize_base_model(cfg)
    assert not (tmp_path / "t" / "base-quantized").exists()


def test_base_hard_links_a_local_folder_and_never_changes_it(tiny_hf_model, tmp_path):
    """02 links a local folder's weights (no second copy on disk). Nothing the pipeline does to base/
    writes through the link: config.json is normalised into a new file, modes stay the source's,
    and a second 02 (or a deleted run) leaves the source's files as they were."""
    from pipeline.fsio import hash_model_dir

    src = tmp_path / "src"
    shutil.copytree(tiny_hf_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    (src / "config.json").write_text(json.dumps(config))  # normalised by 02: rewritten in base/
    weights = sorted(src.glob("*.safetensors"))
    for f in weights:
        f.chmod(0o440)  # a mode atomic_path would otherwise "normalise" to 0644
    before = {f.name: (f.read_bytes(), f.stat().st_mode, f.stat().st_mtime_ns) for f in src.iterdir()}
    source_hash = hash_model_dir(src)
    cfg = make_cfg(tmp_path / "models", src)
    result = fetch_base_model(cfg)
    base = result.path
    assert result.source["weights"] == "hard-linked"
    for f in weights:
        assert (base / f.name).stat().st_ino == f.stat().st_ino
    assert (base / "config.json").stat().st_ino != (src / "config.json").stat().st_ino
    assert "rope_theta" in json.loads((base / "config.json").read_text())
    quantize_base_model(cfg)  # reads the linked weights
    fetch_base_model(cfg)  # replaces base/ (a rename; the old folder's links removed)
    shutil.rmtree(base)
    after = {f.name: (f.read_bytes(), f.stat().st_mode, f.stat().st_mtime_ns) for f in src.iterdir()}
    assert after == before and hash_model_dir(src) == source_hash


def test_base_copies_across_file_systems(tiny_hf_model, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system")
    models = Path(shm / f"p02-test-{os.getpid()}")
    try:
        result = fetch_base_model(make_cfg(models, tiny_hf_model("llama")))
        assert result.source["weights"] == "copied"
        for f in tiny_hf_model("llama").glob("*.safetensors"):
            assert (result.path / f.name).read_bytes() == f.read_bytes()
            assert (result.path / f.name).stat().st_ino != f.stat().st_ino
    finally:
        shutil.rmtree(models, ignore_errors=True)
