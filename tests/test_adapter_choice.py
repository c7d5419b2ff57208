"""05-10 use the best adapter (adapters/best/, the lowest validation loss) by default; `--adapter last`
(ADAPTER=last) the last step's (adapters/). One tiny trained run is shared by the module; each test
copies it, then its adapters/best/ is made from an EARLIER checkpoint, so best and last differ."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.fsio import sha256_file
from pipeline.manifest import ChangedOutputError, read_adapter_manifest, read_manifest
from pipeline.paths import GivenPaths, RunPaths, choose_adapter

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {
    "data.sample_rows": 40, "train.iters": 4, "train.steps_per_eval": 2, "train.steps_per_report": 2,
    "train.save_every": 2, "train.val_batches": 1, "train.batch_size": 2, "train.num_layers": -1,
    "train.learning_rate": 1e-2, "train.keep_best": False, "train.keep_checkpoints": 0,
    "eval.max_samples": 1, "eval.max_tokens": 4, "eval.show_samples": 0, "quantize.group_size": 32,
}
BEST_STEP, BEST_LOSS = 2, 0.4123


def make_cfg(models_dir: Path, **keys):
    values = {"models_dir": str(models_dir), "run": "t", "model.source": "unused", **TRAIN}
    values.update({k.replace("__", "."): v for k, v in keys.items()})
    return load_config(None, values, env={})


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, tiny_hf_model) -> Path:
    """base -> data -> quantize -> train (QLoRA, 4 steps, checkpoints at 2 and 4), then adapters/best/
    from step 2's checkpoint, recorded in the 04 manifest as training records it. Never modified."""
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    from pipeline.phases.p03_quantize_base_model import quantize_base_model
    from pipeline.phases.p04_train_lora import train_lora

    root = tmp_path_factory.mktemp("adapter-choice")
    cfg = make_cfg(root, model__source=str(tiny_hf_model("llama")))
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    train_lora(cfg)
    adapters = root / "t" / "adapters"
    step = next(p for p in sorted((adapters / "checkpoints").iterdir()) if p.name.endswith(f"-{BEST_STEP:07d}"))
    best = adapters / "best"
    shutil.rmtree(best, ignore_errors=True)
    best.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(step / name, best / name)
    (best / "best.json").write_text(json.dumps({"step": BEST_STEP, "val_loss": BEST_LOSS}))
    manifest = json.loads((adapters / "manifest.json").read_text())
    manifest["outputs"]["best"] = {"path": str(best / "adapters.safetensors"),
                                   "sha256": sha256_file(best / "adapters.safetensors"),
                                   "step": BEST_STEP, "val_loss": BEST_LOSS}
    manifest.pop("file_stats", None)
    (adapters / "manifest.json").write_text(json.dumps(manifest))
    assert sha256_file(best / "adapters.safetensors") != sha256_file(adapters / "adapters.safetensors")
    return root


@pytest.fixture
def run(trained_root, tmp_path) -> Path:
    """A copy of the trained run (models dir tmp_path/models, run t) this test may change."""
    shutil.copytree(trained_root / "t", tmp_path / "models" / "t",
                    ignore=shutil.ignore_patterns("eval", "fused*", "hf*", "gguf", "verify"))
    return tmp_path / "models" / "t"


def test_choice_best_by_default_last_on_request(run):
    paths = RunPaths(make_cfg(run.parent))
    choice = paths.adapter_choice
    assert paths.adapter == run / "adapters" / "best" and paths.adapters == run / "adapters"
    assert (choice.kind, choice.step, choice.val_loss, choice.label) == ("best", 2, BEST_LOSS, "adapters/best/")
    assert choice.describe() == f"adapter: best (step 2, val loss 0.412) from {run / 'adapters' / 'best'}/"
    last = RunPaths(make_cfg(run.parent, adapter="last"))
    assert last.adapter == run / "adapters" and last.adapter_choice.label == "adapters/"
    assert last.adapter_choice.describe().startswith("adapter: last step (chosen with --adapter last")
    # The 04 manifest with its best record reads clean: best/adapters.safetensors is checked against
    # outputs.best, not mistaken for adapters/adapters.safetensors (same name, one folder up).
    read_manifest(run / "adapters", "train")
    assert read_adapter_manifest(run / "adapters", "best")["outputs"]["best"]["step"] == 2


def test_eval_uses_best_by_default_and_last_with_the_flag(run, monkeypatch):
    from pipeline.phases.p05_evaluate import evaluate

    for var in ("ADAPTER", "TEST_MODE", "RUN", "MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    best = evaluate(make_cfg(run.parent), skip_base=True)
    manifest = json.loads((run / "eval" / "manifest.json").read_text())
    assert manifest["inputs"]["adapter_sha256"] == sha256_file(run / "adapters" / "best" / "adapters.safetensors")
    assert manifest["adapter"]["adapter"] == "best" and manifest["adapter"]["step"] == 2

    r = CliRunner().invoke(cli.main, ["eval", "--models-dir", str(run.parent), "--run", "t", "--skip-base",
                                      "--max-samples", "1", "--max-tokens", "4", "--adapter", "last"])
    assert r.exit_code == 0, r.output
    assert f"adapter: last step (chosen with --adapter last / ADAPTER=last) from {run / 'adapters'}/" in r.output
    manifest = json.loads((run / "eval" / "manifest.json").read_text())
    assert manifest["inputs"]["adapter_sha256"] == sha256_file(run / "adapters" / "adapters.safetensors")
    assert manifest["adapter"] == {"adapter": "last", "folder": str(run / "adapters"),
                                   "sha256": manifest["inputs"]["adapter_sha256"]}
    last_loss = json.loads((run / "eval" / "results.json").read_text())["adapter"]["test_loss"]
    assert last_loss != best.adapter["test_loss"]


def _weights(folder: Path) -> dict:
    import mlx.core as mx

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _same(a: dict, b: dict) -> bool:
    import mlx.core as mx

    return a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_fuse_default_fuses_best_and_the_path_form_picks_best(run, tmp_path, monkeypatch):
    from pipeline.phases.p07_fuse_lora import fuse

    monkeypatch.delenv("ADAPTER", raising=False)
    cfg = make_cfg(run.parent, fuse__dequantize=True)
    best = fuse(cfg)
    manifest = json.loads((best.path / "manifest.json").read_text())
    assert manifest["adapter"]["adapter"] == "best" and manifest["adapter"]["step"] == 2
    assert manifest["inputs"]["adapter"]["path"] == str(run / "adapters" / "best")
    assert best.sizes["adapter"] == (run / "adapters" / "best" / "adapters.safetensors").stat().st_size
    best_weights = _weights(best.path)

    last = fuse(make_cfg(run.parent, fuse__dequantize=True, adapter="last"), RunPaths(
        make_cfg(run.parent, adapter="last"), variant="last"))
    assert json.loads((last.path / "manifest.json").read_text())["adapter"]["adapter"] == "last"
    assert not _same(best_weights, _weights(last.path))  # another adapter, other fused weights

    # The guides' path form: --adapter-path <run>/adapters holds best/, which the default uses.
    r = CliRunner().invoke(cli.main, ["fuse", "--base-model", str(run / "base-quantized"), "--adapter-path",
                                      str(run / "adapters"), "--output-dir", str(tmp_path / "given"),
                                      "--de-quantize"])
    assert r.exit_code == 0, r.output
    assert f"adapter: best (step 2, val loss 0.412) from {run / 'adapters' / 'best'}/" in r.output
    assert json.loads((tmp_path / "given" / "manifest.json").read_text())["adapter"]["adapter"] == "best"
    assert _same(best_weights, _weights(tmp_path / "given"))
    # ... and --adapter last the folder itself.
    given = GivenPaths(make_cfg(run.parent, adapter="last"), adapters=run / "adapters")
    assert given.adapter == run / "adapters" and given.adapter_choice.kind == "last"
    assert given.data == run / "data"
    # A best/ folder named directly is that adapter, checked against its run's manifest.
    direct = choose_adapter(run / "adapters" / "best", "last")
    assert (direct.kind, direct.source) == ("best", run / "adapters")


def test_a_run_without_best_uses_the_last_step(run, capsys):
    from pipeline.phases.p06_generate import generate

    shutil.rmtree(run / "adapters" / "best")
    manifest_path = run / "adapters" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["outputs"]["best"]
    manifest_path.write_text(json.dumps(manifest))
    cfg = make_cfg(run.parent, generate__max_tokens=2)
    assert RunPaths(cfg).adapter == run / "adapters"
    generate(cfg, prompt="hi")
    assert (f"adapter: last step (no adapters/best/: trained with train.keep_best off) from {run / 'adapters'}/"
            in capsys.readouterr().out)


def test_a_damaged_best_adapter_is_named_with_the_fix(run):
    import mlx.core as mx

    from pipeline.phases.p05_evaluate import evaluate
    from pipeline.phases.p07_fuse_lora import fuse

    best = run / "adapters" / "best" / "adapters.safetensors"
    mx.save_safetensors(str(best), {k: v * 2 for k, v in mx.load(str(best)).items()})
    for phase in (lambda cfg: evaluate(cfg, skip_base=True), fuse):
        with pytest.raises(ChangedOutputError) as e:
            phase(make_cfg(run.parent))
        message = str(e.value)
        assert str(best) in message and "make train" in message and "--adapter last (ADAPTER=last)" in message
    assert not (run / "eval").exists() and not (run / "fused").exists()
    # The last step's adapter is untouched and still usable.
    read_adapter_manifest(run / "adapters", "last")


def test_best_not_recorded_by_training_is_refused(run):
    manifest_path = run / "adapters" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["outputs"]["best"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ChangedOutputError, match=r"no outputs\.best.*--adapter last"):
        read_adapter_manifest(run / "adapters", "best")


def test_exports_of_another_adapter_are_refused(run):
    """09's LoRA GGUF and 10 verify refuse when fused/ was made from another adapter than the config
    chooses now (ADAPTER changed between phases): the GGUFs would carry two different fine-tunes."""
    from pipeline.adapter_gguf import check_fused_adapter
    from pipeline.phases.p10_verify_gguf import _check_adapter

    last = RunPaths(make_cfg(run.parent, adapter="last"))
    best = RunPaths(make_cfg(run.parent))
    fused = {"adapter": best.adapter_choice.record()}
    (run / "fused").mkdir()
    (run / "fused" / "manifest.json").write_text(json.dumps(fused))
    check_fused_adapter(best, best.adapter_choice)
    with pytest.raises(PipelineError, match=r"fused from the best \(step 2\) adapter.*ADAPTER=last"):
        check_fused_adapter(last, last.adapter_choice)
    _check_adapter(best.adapter_choice, fused, {}, trained=False)
    with pytest.raises(PipelineError, match=r"best \(step 2\) adapter.*--adapter best \(ADAPTER=best\)"):
        _check_adapter(last.adapter_choice, fused, {}, trained=False)
    gguf = {"outputs": {"adapter_gguf": {"adapter_gguf": "gguf/t-adapter-LoRA-F16.gguf",
                                         "adapter": last.adapter_choice.record()}}}
    with pytest.raises(PipelineError, match=r"t-adapter-LoRA-F16.gguf was made from the last step's adapter"):
        _check_adapter(best.adapter_choice, fused, gguf, trained=True)


def test_make_remembers_the_adapter_choice(tmp_path):
    """`make fuse ADAPTER=last` after `make fuse` re-fuses: the choice is a stamp eval and fuse depend on."""
    out = subprocess.run(["make", "-n", "fuse", "eval", f"MODELS_DIR={tmp_path}", "ADAPTER=last"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ADAPTER=last" in out.stdout and ".adapter-choice" in out.stdout
    make = (ROOT / "Makefile").read_text()
    assert "export DEQUANTIZE QUANTS IMATRIX ADAPTER" in make
