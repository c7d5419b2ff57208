"""04 train beyond mlx-lm: length-bucketed batches, the best adapter kept, early stopping,
gradient accumulation, and data-parallel ranks under mlx.launch (ring backend, 2 local ranks).

Real MLX on CPU in float32, a tiny random llama, the real CLI and the real mlx.launch.
Tolerance for 'the same run split differently' (accumulation, ranks): the step's loss is the
same sum of per-token losses divided by the same count, only added in another order, so the
first step agrees to float32 rounding (~1e-7 relative); later steps carry that rounding through
Adam, whose update is normalised per weight, so we allow 1e-4 relative over 6 steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.batching import BucketedBatches, epoch_plan, padded_width, validation_batches
from pipeline.config import KEYS, load_config
from pipeline.phases.p01_prepare_data import prepare_data
from pipeline.phases.p02_fetch_base_model import fetch_base_model
from pipeline.phases.p03_quantize_base_model import quantize_base_model
from pipeline.phases.p04_train_lora import train_lora

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = sorted({f.metadata["env"] for f in KEYS.values() if f.metadata["env"]} | {"USE_LORA"})
BASE = {"run": "t", "model.source": "unused", "data.sample_rows": 48, "quantize.group_size": 32,
        "train.batch_size": 4, "train.num_layers": -1, "train.learning_rate": 1e-3, "train.steps_per_report": 1,
        "train.steps_per_eval": 2, "train.val_batches": 2, "train.save_every": 2, "train.keep_checkpoints": 0,
        "train.iters": 6}


def cfg_for(models_dir: Path, **keys):
    values = {"models_dir": str(models_dir), **BASE, **{k.replace("__", "."): v for k, v in keys.items()}}
    return load_config(None, values, env={})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_hf_model) -> Path:
    root = tmp_path_factory.mktemp("features-prepared")
    cfg = cfg_for(root, model__source=str(tiny_hf_model("llama")))
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    return root


def copy_prepared(prepared: Path, dst: Path) -> Path:
    shutil.copytree(prepared / "t", dst / "t", ignore=shutil.ignore_patterns("adapters", ".adapters.partial"))
    return dst


def read_log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "t" / "adapters" / "train_log.jsonl").read_text().splitlines()]


def train_losses(root: Path) -> np.ndarray:
    return np.array([r["train_loss"] for r in read_log(root) if "train_loss" in r])


def val_losses(root: Path) -> np.ndarray:
    return np.array([r["val_loss"] for r in read_log(root) if "val_loss" in r])


# --- batching -------------------------------------------------------------------------------------


def skewed_lengths(n=400, seed=1) -> list[int]:
    rng = np.random.default_rng(seed)
    short = rng.integers(20, 60, size=int(n * 0.9))
    long = rng.integers(300, 500, size=n - len(short))
    return [int(x) for x in rng.permutation(np.concatenate([short, long]))]


def padding_percent(lengths, batches) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * padded_width(max(lengths[i] for i in b)) for b in batches)
    return 100 * (1 - real / padded)


def test_bucketing_cuts_padding_and_keeps_epoch_coverage():
    lengths = skewed_lengths()
    bucketed = epoch_plan(lengths, 4, 64, seed=0, epoch=0)
    plain = epoch_plan(lengths, 4, 1, seed=0, epoch=0)
    assert padding_percent(lengths, bucketed) <= 10 < padding_percent(lengths, plain)
    for plan in (bucketed, plain):
        rows = [i for b in plan for i in b]
        assert len(rows) == len(set(rows)) == len(lengths) // 4 * 4  # every row once, less the remainder
    # Seeded, and each epoch its own order (rows meet other rows).
    assert epoch_plan(lengths, 4, 64, 0, 0) == bucketed != epoch_plan(lengths, 4, 64, 0, 1)
    assert epoch_plan(lengths, 4, 64, 1, 0) != bucketed


def test_padded_width_wastes_under_an_eighth_with_few_shapes():
    widths = {padded_width(n) for n in range(1, 4097)}
    assert all(n <= padded_width(n) < n * 1.0625 + 1 for n in range(1, 4097))
    assert len(widths) < 200  # 16 per power of two, vs 4096 lengths


def test_batch_k_depends_on_seed_and_position_only():
    lengths = skewed_lengths(50)
    a = BucketedBatches(lengths, 4, 8, seed=3)
    drawn = [a.next() for _ in range(30)]  # past the 12 batches of an epoch
    b = BucketedBatches(lengths, 4, 8, seed=3)
    b.restore({"position": 17})
    assert [b.next() for _ in range(13)] == drawn[17:]


def test_validation_batches_are_fixed_and_spread():
    lengths = skewed_lengths(100)
    two = validation_batches(lengths, 4, 2)
    assert two == validation_batches(lengths, 4, 2) and len(two) == 2
    assert max(lengths[i] for i in two[1]) > max(lengths[i] for i in two[0])
    assert sorted(i for b in validation_batches(lengths, 4, -1) for i in b) == list(range(100))


# --- best adapter, early stopping, accumulation -----------------------------------------------------------


def test_best_adapter_is_the_lowest_validation_loss(prepared, tmp_path):
    import mlx.core as mx

    root = copy_prepared(prepared, tmp_path)
    # A learning rate this high makes the validation loss go up again: best != last.
    train_lora(cfg_for(root, train__learning_rate=0.05, train__iters=8))
    log, adapters = read_log(root), root / "t" / "adapters"
    vals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    best = json.loads((adapters / "best" / "best.json").read_text())
    assert best["step"] == min(vals, key=vals.get) and best["val_loss"] == vals[best["step"]]
    manifest = json.loads((adapters / "manifest.json").read_text())
    assert manifest["outputs"]["best"]["step"] == best["step"] == manifest["result"]["best"]["step"]
    assert (adapters / "best" / "adapter_config.json").read_text() == (adapters / "adapter_config.json").read_text()
    if best["step"] != 8:
        a, b = mx.load(str(adapters / "best" / "adapters.safetensors")), mx.load(str(adapters / "adapters.safetensors"))
        assert any(not np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert [r.get("best", False) for r in log if "val_loss" in r].count(True) >= 1


def test_early_stopping_stops_cleanly_after_patience(prepared, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    r = train_lora(cfg_for(root, train__learning_rate=0.05, train__iters=40, train__steps_per_eval=1,
                           train__early_stopping_patience=2))
    assert r.stopped_early is not None, "the loss kept falling at lr 0.05: pick a higher one"
    step, best = r.stopped_early["step"], r.stopped_early["best_step"]
    vals = [(x["step"], x["val_loss"]) for x in read_log(root) if "val_loss" in x]
    assert step < 40 and step == best + 2 and vals[-1][0] == step
    assert all(v >= dict(vals)[best] for s, v in vals if s > best)
    ckpts = sorted(p.name for p in (root / "t" / "adapters" / "checkpoints").iterdir())
    assert ckpts[-1] == f"step-{step:07d}"
    assert json.loads((root / "t" / "adapters" / "best" / "best.json").read_text())["step"] == best


def test_gradient_accumulation_equals_the_larger_batch(prepared, tmp_path):
    """2 accumulated batches of 2 rows = one batch of 4: the same rows per step, the same loss."""
    ref = copy_prepared(prepared, tmp_path / "ref")
    train_lora(cfg_for(ref, train__batch_size=4, train__val_batches=-1))
    acc = copy_prepared(prepared, tmp_path / "acc")
    train_lora(cfg_for(acc, train__batch_size=2, train__grad_accumulation_steps=2, train__val_batches=-1))
    a, b = train_losses(acc), train_losses(ref)
    assert len(a) == len(b) == 6
    assert abs(a[0] - b[0]) <= 1e-6 * b[0]
    np.testing.assert_allclose(a, b, rtol=1e-4)
    np.testing.assert_allclose(val_losses(acc), val_losses(ref), rtol=1e-4)  # the whole split, either way
    trained = [r["trained_tokens"] for r in read_log(acc) if "train_loss" in r]
    assert trained == [r["trained_tokens"] for r in read_log(ref) if "train_loss" in r]


# --- data-parallel ranks ----------------------------------------------------------------------------------


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ENV_VARS and not k.startswith("MLX_")}
    e["PYTHONPATH"] = str(ROOT)
    return e


def cli(root: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "pipeline.cli", "train", "--models-dir", str(root)]
    for k, v in BASE.items():
        if k.startswith("train.") or k == "run":
            args += [f"--{k.split('.')[-1].replace('_', '-')}", str(v)]
    return args + list(extra)


def rank_pids(root: Path) -> dict[int, int]:
    """rank -> pid of this run's training ranks (their environment holds MLX_RANK)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            environ = dict(x.split(b"=", 1) for x in (p / "environ").read_bytes().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if b"pipeline.cli" in cmd and b"MLX_RANK" in environ and str(root).encode() in b"".join(cmd):
            out[int(environ[b"MLX_RANK"])] = int(p.name)
    return out


def test_two_ranks_give_the_one_process_run(prepared, tmp_path):
    one = copy_prepared(prepared, tmp_path / "one")
    train_lora(cfg_for(one))
    two = copy_prepared(prepared, tmp_path / "two")
    r = subprocess.run(cli(two, "--nproc", "2"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data-parallel training: 2 local ranks, mlx.launch backend ring" in r.stdout
    assert "data-parallel: 2 ranks, 2 rows each per batch (global batch 4)" in r.stdout
    a, b = train_losses(one), train_losses(two)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-4)
    np.testing.assert_allclose(val_losses(two), val_losses(one), rtol=1e-4)
    assert abs(b[0] - a[0]) <= 1e-6 * a[0]
    manifest = json.loads((two / "t" / "adapters" / "manifest.json").read_text())
    assert manifest["ranks"] == 2
    # Written once, by rank 0: one line per step in the log, one checkpoint per save.
    assert [x["step"] for x in read_log(two) if "train_loss" in x] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (two / "t" / "adapters" / "checkpoints").iterdir()) == [
        "step-0000002", "step-0000004", "step-0000006"]


def test_sigkill_of_a_rank_stops_the_run_resumably(prepared, tmp_path):
    root = copy_prepared(prepared, tmp_path)
    work = root / "t" / ".adapters.partial"
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli(root, "--nproc", "2", "--iters", "400"), cwd=ROOT, env=env(),
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (work / "checkpoints" / "step-0000002" / "manifest.json").is_file():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint 2"
        time.sleep(0.05)
    pids = rank_pids(root)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=120) == 2
    text = log.read_text()
    assert "a rank failed or was killed" in text and "the newest checkpoint is step" in text, text
    assert "--resume" in text and not (root / "t" / "adapters").exists()
    assert not rank_pids(root), "a rank outlived the run"
    newest = int(text.split("the newest checkpoint is step ")[1].split()[0])
    r = subprocess.run(cli(root, "--nproc", "2", "--iters", str(newest + 2), "--resume"), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout
    manifest = json.loads((root / "t" / "adapters" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == newest
    assert [x["step"] for x in read_log(root) if "train_loss" in x] == list(range(1, newest + 3))


def test_masked_loss_is_the_mean_cross_entropy_of_the_trained_targets(tiny_hf_model):
    """Checked against numpy: log-softmax of the logits at each position, the next token's value,
    averaged over the targets whose mask is 1 (padding and prompt targets count for nothing)."""
    import mlx.core as mx
    from mlx_lm import load

    from pipeline.batching import collate
    from pipeline.data.trained_tokens import Encoded
    from pipeline.trainer import masked_loss

    model, _ = load(str(tiny_hf_model("llama")))
    rng = np.random.default_rng(0)
    encoded = [Encoded(list(rng.integers(5, 400, n)), [0] * 3 + [1] * (n - 3)) for n in (9, 14)]
    batch = collate(encoded, [0, 1], 512)
    loss_sum, n = masked_loss(model, batch.tokens, batch.mask, batch.trained, batch.weight)
    logits = np.array(model(batch.tokens[:, :-1]).astype(mx.float32), dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets, mask = np.array(batch.tokens)[:, 1:], np.array(batch.mask)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert n.item() == mask.sum() == (9 - 3) + (14 - 3)
    assert abs(loss_sum.item() / n.item() - (-(picked * mask).sum() / mask.sum())) < 1e-4


def test_head_only_at_trained_targets_gives_the_full_logits_loss_and_gradients(tiny_model_dir):
    """masked_loss runs each architecture's own head (tied or not, Granite's logits scaling) on the
    trained positions only: its loss and LoRA gradients equal those of the full logits, masked."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from pipeline.batching import collate
    from pipeline.data.trained_tokens import Encoded
    from pipeline.trainer import masked_loss

    model, _ = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    # LoRA's B starts at 0 (A's gradients would be 0): move every adapter value a little.
    model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
    rng = np.random.default_rng(1)

    def full(model, tokens, mask):
        ce = nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]) * mask
        return ce.sum(), mask.sum()

    prompts = [Encoded(list(rng.integers(5, 400, n)), [0] * 4 + [1] * (n - 6) + [0, 1]) for n in (11, 17, 8)]
    text = [Encoded(list(rng.integers(5, 400, 17)), [1] * 17) for _ in range(2)]  # every target trained
    for encoded, gathered in ((prompts, True), (text, False)):
        batch = collate(encoded, list(range(len(encoded))), 512)
        n = sum(sum(e.mask[1:]) for e in encoded)  # targets are the tokens after the first
        assert int(batch.weight.sum().item()) == int(batch.mask.sum().item()) == n
        assert batch.trained.shape[0] >= n  # rounded like the widths, the padding weighing 0
        assert (batch.trained.size < batch.mask.size) == gathered  # else all positions' logits, as before
        (a, n_a), g_a = nn.value_and_grad(model, full)(model, batch.tokens, batch.mask)
        (b, n_b), g_b = nn.value_and_grad(model, masked_loss)(model, batch.tokens, batch.mask, batch.trained,
                                                              batch.weight)
        assert n_a.item() == n_b.item() == n
        assert abs(a.item() - b.item()) <= 1e-4 * abs(a.item())
        for (k, x), (_, y) in zip(tree_flatten(g_a), tree_flatten(g_b)):
            assert np.allclose(np.array(x), np.array(y), rtol=1e-3, atol=1e-6), k


def test_data_parallel_settings_that_cannot_work_are_refused_before_launch(tmp_path):
    from pipeline.errors import MissingInputError, PipelineError

    with pytest.raises(PipelineError, match=r"train.batch_size 3 does not split over train.nproc 2"):
        train_lora(cfg_for(tmp_path, train__nproc=2, train__batch_size=3))
    with pytest.raises(MissingInputError, match=r"train.hosts .*nohosts.json: no such file"):
        train_lora(cfg_for(tmp_path, train__hosts=str(tmp_path / "nohosts.json")))
    assert not (tmp_path / "t").exists()  # nothing written


def test_eta_leaves_out_warm_up_and_validation():
    from pipeline.progress import Eta, clock

    eta = Eta(total=100)
    eta.step(30.0)  # step 1 compiles the graph
    assert eta.remaining() is None and eta.text() == "eta after warm-up"
    eta.step(1.0)
    eta.step(1.2)
    assert eta.remaining() == pytest.approx(97 * 1.1)  # tqdm's average would say 97 x 10.7 s
    eta.pause(20.0)  # the first validation compiles its own graph
    assert eta.remaining(pauses_left=3) == pytest.approx(97 * 1.1 + 3 * 20.0)
    eta.pause(2.0)
    assert eta.remaining(pauses_left=3) == pytest.approx(97 * 1.1 + 3 * 2.0)
    assert (clock(7), clock(245), clock(3723)) == ("0:07", "4:05", "1:02:03")
    trials = Eta(total=4)  # sweep trials: the first one stands in until a second is timed
    trials.skip()
    trials.step(100.0)
    assert trials.remaining() is None and trials.remaining(provisional=True) == pytest.approx(200.0)
    trials.step(80.0)
    assert trials.text(provisional=True) == "eta 1:20"


def test_training_bar_shows_our_eta(prepared, tmp_path, capfd):
    root = copy_prepared(prepared, tmp_path)
    train_lora(cfg_for(root, train__iters=4))
    err = capfd.readouterr().err
    assert "eta after warm-up" in err
    assert re.search(r"eta \d+:\d\d, loss=", err), err[-500:]
