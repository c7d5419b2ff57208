"""True resume of 04 train: kill -9 / Ctrl-C, then `--resume` gives the uninterrupted run exactly.

Real MLX on CPU, a tiny random llama, the real CLI in a subprocess for the interrupted runs.
Tolerance: none. On CPU float32 the resumed run's per-step train losses, validation losses and
learning rates equal the uninterrupted run's as logged, and its final adapter weights and Adam
state equal them bit for bit (np.array_equal). The config uses LoRA dropout (MLX random key),
a warmup + cosine schedule (optimizer step), 2 accumulated batches per step over 5 epochs of
length-bucketed batches with validation in between (data order), and keeps the best adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.config import KEYS, load_config
from pipeline.errors import PipelineError
from pipeline.phases.p01_prepare_data import prepare_data
from pipeline.phases.p02_fetch_base_model import fetch_base_model
from pipeline.phases.p03_quantize_base_model import quantize_base_model
from pipeline.phases.p04_train_lora import train_lora

ROOT = Path(__file__).resolve().parents[1]
PREP = {"data.sample_rows": 40, "quantize.group_size": 32, "train.batch_size": 4}
# 4 steps per epoch (2 batches of 4 each): 20 steps run 5 epochs, with validations between the epochs' shuffles.
TRAIN = {
    "train.iters": 20, "train.batch_size": 4, "train.num_layers": -1, "train.learning_rate": 1e-3,
    "train.steps_per_report": 1, "train.steps_per_eval": 5, "train.val_batches": 1, "train.save_every": 4,
    "train.keep_checkpoints": 0, "train.dropout": 0.1, "train.lr_schedule": "cosine", "train.warmup_steps": 2,
    "train.grad_accumulation_steps": 2, "train.bucket_window": 2,
}
ENV_VARS = sorted({f.metadata["env"] for f in KEYS.values() if f.metadata["env"]} | {"USE_LORA"})


def cfg_for(models_dir: Path, **keys):
    values = {"models_dir": str(models_dir), "run": "t", "model.source": "unused", **PREP, **TRAIN}
    values.update({k.replace("__", "."): v for k, v in keys.items()})
    return load_config(None, values, env={})


def cli_args(models_dir: Path, **keys) -> list[str]:
    values = {**TRAIN, **{k.replace("__", "."): v for k, v in keys.items()}}
    args = ["train", "--models-dir", str(models_dir), "--run", "t"]
    for k, v in values.items():
        args += [f"--{k.split('.')[-1].replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_hf_model) -> Path:
    """base, data and 4-bit base of a tiny llama, prepared once; tests copy run 't' from here."""
    root = tmp_path_factory.mktemp("resume-prepared")
    cfg = cfg_for(root, model__source=str(tiny_hf_model("llama")))
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    return root


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """The uninterrupted run (in-process): its adapters/ folder."""
    root = copy_prepared(prepared, tmp_path_factory.mktemp("reference"))
    train_lora(cfg_for(root))
    return root / "t" / "adapters"


def copy_prepared(prepared: Path, dst_root: Path) -> Path:
    shutil.copytree(prepared / "t", dst_root / "t", ignore=shutil.ignore_patterns("adapters", ".adapters.partial"))
    return dst_root


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    e["PYTHONPATH"] = str(ROOT)
    return e


def start_cli(models_dir: Path, *extra: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *cli_args(models_dir), *extra],
                                cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def logged_steps(work: Path) -> list[int]:
    try:
        text = (work / "train_log.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.splitlines()
            if line.strip().endswith("}") and "train_loss" in line]


def read_log(adapters: Path) -> list[dict]:
    return [json.loads(line) for line in (adapters / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(resumed: Path, reference: Path) -> dict:
    """Per-step losses, learning rates, validation losses, final weights and Adam state: equal."""
    import mlx.core as mx

    keep = ("step", "train_loss", "val_loss", "learning_rate")
    ref = [{k: r[k] for k in keep if k in r} for r in read_log(reference)]
    got = [{k: r[k] for k in keep if k in r} for r in read_log(resumed)]
    assert [r["step"] for r in got if "train_loss" in r] == list(range(1, 21))
    losses = np.array([[a.get("train_loss", 0.0), b.get("train_loss", 0.0)] for a, b in zip(ref, got)])
    assert got == ref, f"max |loss difference| {np.abs(losses[:, 0] - losses[:, 1]).max()}"
    assert (resumed / "best" / "best.json").read_text() == (reference / "best" / "best.json").read_text()
    for name, folder in (("adapters.safetensors", ""), ("optimizer.safetensors", "checkpoints/step-0000020"),
                         ("adapters.safetensors", "best")):
        a, b = mx.load(str(reference / folder / name)), mx.load(str(resumed / folder / name))
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(np.array(a[k]), np.array(b[k])), f"{name}: {k} differs"
    return json.loads((resumed / "manifest.json").read_text())


def test_sigkill_twice_then_resume_reproduces_the_uninterrupted_run(prepared, reference, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    work = root / "t" / ".adapters.partial"
    # 1. kill -9 right after the checkpoint at step 4 is complete.
    proc = start_cli(root, log=tmp_path / "run1.log")
    wait_for(proc, lambda: (work / "checkpoints" / "step-0000004" / "manifest.json").is_file(), "checkpoint 4")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    # 2. resume, and kill -9 again between checkpoints, after step 10 is logged (checkpoints: 4, 8, 12).
    proc = start_cli(root, "--resume", log=tmp_path / "run2.log")
    wait_for(proc, lambda: 10 in logged_steps(work), "step 10")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    out2 = (tmp_path / "run2.log").read_text()
    assert "resuming from" in out2 and "step-000000" in out2, out2
    newest = max(int(p.name[5:]) for p in (work / "checkpoints").glob("step-*") if (p / "manifest.json").is_file())
    # 3. resume to the end.
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *cli_args(root), "--resume"],
                       cwd=ROOT, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = assert_same_run(root / "t" / "adapters", reference)
    assert manifest["resumed_from_step"] == newest and newest < 20


def test_ctrl_c_saves_a_checkpoint_and_exits_130(prepared, reference, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    work = root / "t" / ".adapters.partial"
    log = tmp_path / "run.log"
    proc = start_cli(root, log=log)
    wait_for(proc, lambda: 6 in logged_steps(work), "step 6")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    out = log.read_text()
    assert "Traceback" not in out, out
    assert "interrupted at step" in out and "mlx-pipeline train --resume" in out and "RESUME=1" in out, out
    step = int(out.split("interrupted at step ")[1].split(";")[0])
    ckpt = work / "checkpoints" / f"step-{step:07d}"
    assert (ckpt / "manifest.json").is_file() and f"checkpoint saved to {ckpt}" in out
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == step and state["data_order"]["position"] == step
    assert not (root / "t" / "adapters").exists()
    train_lora(cfg_for(root), resume=True)
    manifest = assert_same_run(root / "t" / "adapters", reference)
    assert manifest["resumed_from_step"] == step


def test_second_ctrl_c_aborts_at_once(prepared, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    work = root / "t" / ".adapters.partial"
    log = tmp_path / "run.log"
    proc = start_cli(root, "--iters", "2000", "--save-every", "1000", log=log)
    wait_for(proc, lambda: 2 in logged_steps(work), "step 2")
    proc.send_signal(signal.SIGINT)
    wait_for(proc, lambda: "press Ctrl-C again" in log.read_text(), "the first Ctrl-C's message")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT  # the default action: no checkpoint, no clean-up


@pytest.fixture
def finished(prepared, tmp_path):
    """A finished 4-step run (constant learning rate), every checkpoint kept (2 and 4)."""
    root = copy_prepared(prepared, tmp_path)
    cfg = cfg_for(root, train__iters=4, train__save_every=2, train__lr_schedule="constant", train__warmup_steps=0)
    train_lora(cfg)
    return root, cfg


def test_resume_refuses_changed_config_data_or_base_unless_forced(finished, monkeypatch):
    root, cfg = finished
    run = root / "t"
    more = {"train__iters": 6, "train__save_every": 2, "train__lr_schedule": "constant", "train__warmup_steps": 0}
    with pytest.raises(PipelineError, match=r"train\.learning_rate: 0\.001 -> 0\.002"):
        train_lora(cfg_for(root, train__learning_rate=2e-3, **more), resume=True)
    with pytest.raises(PipelineError, match=r"train\.dropout: 0\.1 -> 0\.0"):
        train_lora(cfg_for(root, train__dropout=0.0, **more), resume=True)
    quantize_base_model(cfg_for(root, quantize__group_size=64))  # another base
    with pytest.raises(PipelineError, match="base model content hash") as e:
        train_lora(cfg_for(root, **more), resume=True)
    assert "--force-resume" in str(e.value)
    assert not (run / ".adapters.partial").exists()  # a refused resume leaves the finished run as it was

    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    args = cli_args(root, train__iters=6, train__save_every=2, train__lr_schedule="constant", train__warmup_steps=0)
    r = CliRunner().invoke(cli.main, [*args, "--resume"])
    assert r.exit_code == 2 and "--resume refused" in r.output and "base model content hash" in r.output, r.output
    r = CliRunner().invoke(cli.main, [*args, "--force-resume"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "adapters" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 4
    assert any("base model content hash" in c for c in manifest["forced_resume_changes"])
    assert [x["step"] for x in read_log(run / "adapters") if "train_loss" in x] == [1, 2, 3, 4, 5, 6]

    prepare_data(cfg_for(root, data__sample_rows=44))  # other data (made by its phase: edits are refused earlier)
    with pytest.raises(PipelineError, match=r"data file train\.jsonl: sha256") as e:
        train_lora(cfg_for(root, **dict(more, train__iters=8)), resume=True)
    assert "base model" not in str(e.value)


def test_resume_after_the_run_finished(finished, prepared, tmp_path_factory):
    """Same iters: nothing to do. More iters (constant schedule): continues exactly like a longer run."""
    import mlx.core as mx

    root, cfg = finished
    adapters = root / "t" / "adapters"
    before = (adapters / "adapters.safetensors").read_bytes()
    r = train_lora(cfg, resume=True)
    assert (adapters / "adapters.safetensors").read_bytes() == before and r.adapter_dir == adapters
    longer = {"train__iters": 6, "train__save_every": 2, "train__lr_schedule": "constant", "train__warmup_steps": 0}
    train_lora(cfg_for(root, **longer), resume=True)
    straight = copy_prepared(prepared, tmp_path_factory.mktemp("straight6"))
    train_lora(cfg_for(straight, **longer))
    losses = [[x["train_loss"] for x in read_log(d / "t" / "adapters") if "train_loss" in x] for d in (root, straight)]
    assert losses[0] == losses[1]
    a = mx.load(str(adapters / "adapters.safetensors"))
    b = mx.load(str(straight / "t" / "adapters" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_incomplete_checkpoints_are_skipped_and_deleted(finished, capsys):
    """A step folder without its manifest and a temporary folder: resume takes the newest complete one."""
    import mlx.core as mx

    root, cfg = finished
    run = root / "t"
    work = run / ".adapters.partial"
    first = {k: np.array(v) for k, v in mx.load(str(run / "adapters" / "adapters.safetensors")).items()}
    shutil.copytree(run / "adapters", work)
    (work / "manifest.json").unlink()
    (work / "checkpoints" / "step-0000004" / "manifest.json").unlink()
    (work / "checkpoints" / ".step-0000006.tmp-12345").mkdir()
    (work / "train_log.jsonl").write_text("garbage from a crashed run\n")
    capsys.readouterr()
    train_lora(cfg, resume=True)
    out = capsys.readouterr().out
    assert "ignoring incomplete checkpoint step-0000004" in out and ".step-0000006.tmp-12345" in out, out
    manifest = json.loads((run / "adapters" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 2
    assert manifest["outputs"]["checkpoints"] == ["step-0000002", "step-0000004"]
    assert [x["step"] for x in read_log(run / "adapters") if "train_loss" in x] == [1, 2, 3, 4]
    # Steps 3-4, trained again from checkpoint 2, give the adapter of the first time bit for bit.
    final = mx.load(str(run / "adapters" / "adapters.safetensors"))
    assert final.keys() == first.keys()
    assert all(np.array_equal(first[k], np.array(final[k])) for k in final)


def test_resume_without_a_checkpoint_names_the_problem(prepared, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    with pytest.raises(PipelineError, match="nothing to resume"):
        train_lora(cfg_for(root), resume=True)
    (root / "t" / ".adapters.partial" / "checkpoints" / ".step-0000004.tmp-1").mkdir(parents=True)
    with pytest.raises(PipelineError, match="no complete checkpoint"):
        train_lora(cfg_for(root), resume=True)


def test_grad_checkpoint_recomputes_without_changing_the_run(prepared, reference, tmp_path):
    """train.grad_checkpoint (mlx-lm's per-layer recompute) trades time for memory, not results
    (without dropout: the recomputed forward pass would draw new dropout masks)."""
    losses = []
    for on in (True, False):
        root = copy_prepared(prepared, tmp_path / str(on))
        train_lora(cfg_for(root, train__grad_checkpoint=on, train__dropout=0.0))
        losses.append([r["train_loss"] for r in read_log(root / "t" / "adapters") if "train_loss" in r])
    assert len(losses[0]) == 20 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_keep_checkpoints_prunes_the_oldest(prepared, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    train_lora(cfg_for(root, train__iters=12, train__keep_checkpoints=2, train__dropout=0.0))
    kept = sorted(p.name for p in (root / "t" / "adapters" / "checkpoints").iterdir())
    assert kept == ["step-0000008", "step-0000012"]
