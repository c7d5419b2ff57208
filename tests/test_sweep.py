"""`mlx-pipeline sweep` on the real SmolLM2-135M and the bundled task, through the real CLI.

A 4-trial sweep is SIGKILLed during trial 2 (once its first checkpoint is complete), then run again:
trial 1 is skipped untouched, trial 2 resumes from its checkpoint, all 4 results come out with test
loss, task metric and storage measured from the files. A one-trial --merge sweep leaves no temporary
model behind and reports its bytes. Bad sweep blocks stop with one error naming the key, exit 2,
before any work; Ctrl-C stops with a checkpoint, exit 130. Tiny settings (4 steps, 2 test rows,
1 answered): the figures are not the point.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import cli
from pipeline.checkpoints import complete_checkpoints
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.fsio import safetensors_numel, sha256_file
from pipeline.sweep_spec import parse_sweep, read_block, trial_config

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "run": "sw",
    "data": {"sample_rows": 20},  # 16 train / 2 valid / 2 test
    "train": {"num_layers": 1, "batch_size": 2, "iters": 4, "save_every": 1, "steps_per_report": 1,
              "steps_per_eval": 1000, "val_batches": 1},
    "eval": {"max_samples": 1, "max_tokens": 12, "show_samples": 0},
}
GRID = {"name": "four", "grid": {"train.rank": [4, 8], "train.learning_rate": [1.0e-4, 3.0e-4]}}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_args(cfg: Path, sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "sweep", "--config", str(cfg), "--sweep", str(sweep), *extra]


def clean_env() -> dict:
    """The developer's shell without the variables of keys the sweeps set (they would be refused)."""
    return {k: v for k, v in os.environ.items() if k not in ("LORA_RANK", "LORA_ALPHA", "ITERS", "SEED", "USE_LORA")}


def stat_bytes(folder: Path) -> int:
    """Every regular file under `folder`, by os.stat: what the sweep must report."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size
    return total


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """The run's base, data and quantized base (02, 01, 03), made once; every trial reads them."""
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    from pipeline.phases.p03_quantize_base_model import quantize_base_model

    tmp = tmp_path_factory.mktemp("sweep")
    cfg_path = write_yaml(tmp / "cfg.yaml", {**SETTINGS, "models_dir": str(tmp / "models")})
    cfg = load_config(cfg_path, env={})
    for phase in (fetch_base_model, prepare_data, quantize_base_model):
        phase(cfg)
    return cfg_path, cfg


def test_sweep_killed_in_trial_2_resumes_and_reports(shared_run, tmp_path):
    cfg_path, cfg = shared_run
    sweep = write_yaml(tmp_path / "sweep.yaml", {"sweep": GRID})
    folder = cfg.run_dir / "sweeps" / "four"
    env = clean_env()

    proc = subprocess.Popen(cli_args(cfg_path, sweep), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if (folder / "plan.json").is_file():
                ids = [t["id"] for t in json.loads((folder / "plan.json").read_text())["trials"]]
                if complete_checkpoints(folder / ids[1] / ".adapters.partial" / "checkpoints"):
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before trial 2 had a checkpoint:\n{proc.communicate()[0]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        first_output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    assert (folder / ids[0] / "manifest.json").is_file(), first_output
    assert not (folder / ids[1] / "manifest.json").exists()
    adapter1 = folder / ids[0] / "adapters" / "adapters.safetensors"
    before = (adapter1.stat().st_mtime_ns, sha256_file(adapter1))

    done = subprocess.run(cli_args(cfg_path, sweep), cwd=REPO, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "trial 1/4 (rank=4, lr=0.0001): finished earlier, skipped" in out
    assert "trial 2/4 (rank=4, lr=0.0003): resuming the interrupted training" in out
    assert "eta " in out  # measured from the trials this process finished
    assert (adapter1.stat().st_mtime_ns, sha256_file(adapter1)) == before
    trained2 = json.loads((folder / ids[1] / "adapters" / "manifest.json").read_text())
    assert 1 <= trained2["resumed_from_step"] < 4  # killed within 50 ms of its first checkpoint

    results = json.loads((folder / "results.json").read_text())
    trials = results["trials"]
    assert [t["id"] for t in trials] == ids and len(trials) == 4
    assert results["primary_metric"] == "json_match"
    for t in trials:
        r = t["result"]
        assert math.isfinite(r["test_loss"]) and r["test_loss"] > 0
        assert 0.0 <= r["metric"]["json_match"] <= 100.0 and r["scored_rows"] == 1
        assert t["mode"] == "adapter" and t["merge"] is None
    assert trials[2]["settings"] == {"train.rank": 8, "train.learning_rate": 1e-4}
    # rank 8 trains twice the LoRA parameters of rank 4
    assert trials[2]["trainable_parameters"] == 2 * trials[0]["trainable_parameters"]

    s = results["storage"]
    measured = {i: stat_bytes(folder / i) for i in ids}
    assert s["trial_bytes"] == measured and s["sweep_bytes"] == sum(measured.values())
    assert s["adapter_bytes"] == sum((folder / i / "adapters" / "best" / "adapters.safetensors").stat().st_size
                                     for i in ids)
    params = safetensors_numel(cfg.run_dir / "base")
    assert s["full_checkpoint_bytes"] == params * 2 and s["full_checkpoint_source"].startswith("computed")
    assert s["ratio"] == round(4 * params * 2 / s["sweep_bytes"], 1)
    assert s["ratio"] > 1  # four adapter folders are smaller than four full models
    # adapter-only storage: a scored trial keeps its last and best adapters, not its resumable checkpoints
    assert s["checkpoint_bytes"] == 0 and not any((folder / i / "adapters" / "checkpoints").exists() for i in ids)
    # Nothing of the base was copied: no trial folder holds a file as large as the quantized base's weights.
    biggest = max(f.stat().st_size for i in ids for f in (folder / i).rglob("*") if f.is_file())
    assert biggest < min(f.stat().st_size for f in (cfg.run_dir / "base-quantized").glob("*.safetensors"))
    assert "ratio:" in out and "200x" in out

    md = (folder / "results.md").read_text()
    assert all(f"| {i} |" in md for i in ids)
    page = (folder / "report.html").read_text()
    assert page.count("<table") >= 3 and "data:image/png;base64," in page
    assert (folder / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(folder.glob(".merge-*"))

    again = subprocess.run(cli_args(cfg_path, sweep), cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4, again.stdout + again.stderr


def test_merge_leaves_no_temporary_model(shared_run, tmp_path):
    cfg_path, cfg = shared_run
    sweep = write_yaml(tmp_path / "merge.yaml", {"sweep": {"name": "merged", "runs": [{"train.rank": 4}],
                                                           "fixed": {"train.iters": 1}}})
    done = subprocess.run(cli_args(cfg_path, sweep, "--merge", "--keep-checkpoints"), cwd=REPO, env=clean_env(),
                          capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    folder = cfg.run_dir / "sweeps" / "merged"
    assert not list(folder.glob(".merge-*")) and not list(folder.glob(".*.tmp"))
    results = json.loads((folder / "results.json").read_text())
    (trial,) = results["trials"]
    merge = trial["merge"]
    assert trial["mode"] == "merged" and merge["deleted"] and not Path(merge["temp_path"]).exists()
    # the full-precision fused model: bfloat16 weights plus the tokenizer and config files
    params = safetensors_numel(cfg.run_dir / "base")
    assert params * 2 < merge["temp_bytes"] < params * 2 * 1.05
    s = results["storage"]
    assert s["full_checkpoint_bytes"] == merge["temp_bytes"] and s["full_checkpoint_source"].startswith("measured")
    assert "temporary fused model" in out and "deleted" in out
    assert math.isfinite(trial["result"]["test_loss"])
    assert trial["checkpoint_bytes"] > 0 and (folder / trial["id"] / "adapters" / "checkpoints").is_dir()


def test_ctrl_c_stops_with_a_checkpoint_and_exit_130(shared_run, tmp_path):
    cfg_path, cfg = shared_run
    sweep = write_yaml(tmp_path / "stop.yaml", {"sweep": {"name": "stop", "runs": [{"train.rank": 2}]}})
    folder = cfg.run_dir / "sweeps" / "stop" / "rank2"
    proc = subprocess.Popen(cli_args(cfg_path, sweep), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if complete_checkpoints(folder / ".adapters.partial" / "checkpoints"):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "sweep stopped in trial 1/1 (rank=2); run the same command again to continue" in out
    assert "Traceback" not in out
    assert complete_checkpoints(folder / ".adapters.partial" / "checkpoints")
    assert not (folder / "manifest.json").exists()


@pytest.mark.parametrize("block, env, words", [
    ({"grid": {"train.rank": []}}, {}, ["sweep.grid.train.rank is an empty list"]),
    ({"grid": {"train.lr": [1e-4]}}, {}, ["sweep.grid.train.lr: unknown config key", "train.learning_rate"]),
    ({"grid": {"quantize.bits": [4, 8]}}, {}, ["quantize.bits: not sweepable", "another run"]),
    ({"grid": {"train.rank": [8]}, "fixed": {"train.alpha": 16, "train.scale": 2.0}}, {},
     ["both train.alpha and train.scale"]),
    ({"grid": {"train.rank": [8, 16]}}, {"LORA_RANK": "32"}, ["train.rank", "LORA_RANK=32", "Unset LORA_RANK"]),
    ({"grid": {"train.rank": [8]}, "runs": [{"train.rank": 8}]}, {}, ["trials 1 and 2 are the same"]),
    ({"gird": {"train.rank": [8]}}, {}, ["sweep.gird: unknown part"]),
])
def test_bad_sweep_block_is_refused_before_any_work(shared_run, tmp_path, block, env, words):
    cfg_path, cfg = shared_run
    sweep = write_yaml(tmp_path / "bad.yaml", {"sweep": {"name": "bad", **block}})
    result = CliRunner().invoke(cli.main, ["sweep", "--config", str(cfg_path), "--sweep", str(sweep)],
                                env={"LORA_RANK": "", **env})
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output
    assert not (cfg.run_dir / "sweeps" / "bad").exists()


def test_shipped_sweep_config_and_scale():
    """configs/sweep.yaml validates (4 trials); train.scale sets alpha = scale x rank."""
    path = REPO / "configs" / "sweep.yaml"
    spec = parse_sweep(read_block(path, own_config=False), path, env={})
    assert len(spec.trials) == 4 and len({t.id for t in spec.trials}) == 4
    demo = load_config(REPO / "configs" / "default.yaml", env={})
    for t in spec.trials:
        assert trial_config(demo, t).train.fine_tune_type in ("lora", "dora")
    scaled = parse_sweep({"grid": {"train.rank": [8, 16]}, "fixed": {"train.scale": 2.0}}, "x.yaml", env={})
    assert [trial_config(demo, t).train.alpha for t in scaled.trials] == [16.0, 32.0]
    with pytest.raises(ConfigError, match="no top-level `sweep:` block"):
        read_block(REPO / "configs" / "default.yaml", own_config=False)
