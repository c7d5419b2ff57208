"""04 Train a LoRA / DoRA adapter (or fully fine-tune) with mlx-lm's tuner.

QLoRA trains on the quantized base. On the CPU backend the quantized layers are replaced by
dense layers holding their dequantized values (same function, BLAS speed, see
modeling.dequantize_layers); the adapter then loads unchanged onto the quantized model.
Work happens in models/<run>/.adapters.partial/ and is moved to adapters/ when complete.

Every train.save_every steps (and at the end) a complete checkpoint is written to
checkpoints/step-NNNNNNN/ (pipeline/checkpoints.py); `resume=True` continues from the newest one
exactly: weights, optimizer state, step and learning-rate schedule, random state, data order.
Ctrl-C / SIGTERM finish the current step, save a checkpoint and stop (TrainingInterrupted).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click

from .. import arch
from .. import checkpoints as ckpt
from ..checkpoints import CHECKPOINTS
from ..errors import DataError, PipelineError
from ..fsio import atomic_path, replace_dir, sha256_file, write_json, write_jsonl
from ..manifest import MANIFEST, read_manifest, write_manifest
from ..paths import RunPaths
from ..runtime import backend_name, compute_dtype, is_cpu
from .common import done, start_phase


@dataclass
class TrainResult:
    adapter_dir: Path
    final_train_loss: float
    final_val_loss: float | None
    first_val_loss: float | None
    parameters: dict
    tokens_per_second: float
    peak_memory_gb: float


class TrainingInterrupted(PipelineError):
    """Ctrl-C or SIGTERM stopped training after a step; a complete checkpoint was saved.

    The CLI exits with `exit_code` (128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, step: int, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.step, self.checkpoint, self.exit_code = step, checkpoint, exit_code


def train_lora(cfg, resume: bool = False, force_resume: bool = False) -> TrainResult:
    import mlx.core as mx
    import numpy as np

    from ..modeling import count_parameters, load_model

    started = start_phase(cfg, "04 train", ["quantize", "train"])
    paths = RunPaths(cfg)
    t = cfg.train
    data_manifest = read_manifest(paths.data, "data")
    base_dir = paths.train_base
    base_manifest = read_manifest(base_dir, "quantize" if cfg.quantize.enabled else "base")
    if t.fine_tune_type == "full" and cfg.quantize.enabled:
        raise PipelineError(
            "Full fine-tuning updates every weight and cannot run on a quantized base. "
            "Set quantize.enabled: false (or --no-quantized / QUANTIZE=0), or use LoRA (USE_LORA=1)."
        )
    dtype_name = str(compute_dtype(t.compute_dtype)).replace("mlx.core.", "")
    fp = ckpt.fingerprint(cfg, base_manifest["outputs"]["content_hash"], paths.data, dtype_name)
    work = paths.root / ".adapters.partial"
    start, forced = None, []
    if resume:
        found = _resume_point(cfg, paths, work, fp, force_resume)
        if isinstance(found, TrainResult):
            return found
        start, forced = found
    elif work.exists():
        shutil.rmtree(work)

    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tokenizer, config = load_model(base_dir, t.compute_dtype)
    n_layers = len(model.layers)
    num_layers = n_layers if t.num_layers == -1 or t.num_layers > n_layers else t.num_layers
    if num_layers != t.num_layers:
        click.echo(f"train.num_layers {t.num_layers} -> {num_layers}: the model has {n_layers} layers; adapting all.")

    model.freeze()
    lora_parameters = None
    if t.fine_tune_type == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:
        keys = arch.resolve_targets(config["model_type"], t.targets)
        lora_parameters = {"rank": t.rank, "scale": t.alpha / t.rank, "dropout": t.dropout, "keys": keys}
        _apply_lora(model, num_layers, lora_parameters, t.fine_tune_type == "dora", t.targets)
    if not is_cpu():
        _use_gpu_layers(model, dtype_name)
    params = count_parameters(model)
    click.echo(
        f"parameters: total {params['total']:,} | trainable {params['trainable']:,} "
        f"({params['trainable_percent']:.3f}%) | frozen {params['frozen']:,}"
    )

    train_set, valid_set = _datasets(paths.data, tokenizer, t)
    (work / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    adapter_config = {
        "fine_tune_type": t.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": lora_parameters,
        "alpha": t.alpha,
        "model": str(base_dir),
        "base_model": {
            "path": str(base_dir.resolve()),
            "content_hash": base_manifest["outputs"]["content_hash"],
            "model_type": config["model_type"],
            "quantization": config.get("quantization"),
        },
        "compute_dtype": dtype_name,
        "seed": cfg.seed,
    }
    write_json(work / "adapter_config.json", adapter_config)
    inputs = {
        "base": adapter_config["base_model"],
        "data": {k: v.get("sha256") for k, v in data_manifest["outputs"].items()},
    }

    optimizer = _optimizer(t)
    optimizer.init(model.trainable_parameters())  # the state tree exists before a checkpoint fills it
    resume_state = None
    if start is not None:
        ckpt.load_weights_and_optimizer(start, model, optimizer)
        if forced and t.lr_schedule == "constant" and not t.warmup_steps:
            optimizer.learning_rate = t.learning_rate  # forced onto a new constant rate
        resume_state = dict(start.state(), strict=not forced)

    def save(step: int, state: dict) -> Path:
        path = ckpt.save_checkpoint(work / CHECKPOINTS, step, model, optimizer, dict(state, fingerprint=fp),
                                    work / "adapter_config.json", cfg, started, inputs)
        ckpt.prune(work / CHECKPOINTS, t.keep_checkpoints)
        return path

    if t.grad_checkpoint:  # mlx-lm's: recompute each layer's activations in the backward pass
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    log = _loop(model, optimizer, train_set, valid_set, cfg, work, save, resume_state)
    _save_adapter(model, work / "adapters.safetensors")

    _plot(log, work / "loss.png")
    train_losses = [r["train_loss"] for r in log if "train_loss" in r]
    val_losses = [r["val_loss"] for r in log if "val_loss" in r]
    speeds = [r["tokens_per_second"] for r in log if "tokens_per_second" in r]
    peak = max([r.get("peak_memory_gb", 0.0) for r in log] or [0.0])
    result = dict(
        final_train_loss=train_losses[-1] if train_losses else float("nan"),
        final_val_loss=val_losses[-1] if val_losses else None,
        first_val_loss=val_losses[0] if val_losses else None,
        parameters=params,
        tokens_per_second=round(sum(speeds) / max(len(speeds), 1), 1),
        peak_memory_gb=round(peak, 3),
    )
    extra = {"forced_resume_changes": forced} if forced else {}
    write_manifest(
        work, "04_train_lora", cfg, started,
        inputs=inputs,
        outputs={"adapter": str(paths.adapters / "adapters.safetensors"), "log": "train_log.jsonl", "plot": "loss.png",
                 "checkpoints": [c.path.name for c in ckpt.complete_checkpoints(work / CHECKPOINTS)],
                 # checked by read_manifest when 05/07 read the adapter (pipeline/manifest.py)
                 "adapter_file": {"path": str(paths.adapters / "adapters.safetensors"),
                                  "sha256": sha256_file(work / "adapters.safetensors")}},
        backend=backend_name(),
        result=result,
        resumed_from_step=start.step if start is not None else 0,
        **extra,
    )
    replace_dir(work, paths.adapters)
    done(
        f"adapter ready: {paths.adapters}/adapters.safetensors "
        f"(val loss {result['first_val_loss']} -> {result['final_val_loss']}; loss curve {paths.adapters}/loss.png)"
    )
    return TrainResult(paths.adapters, **result)


def _optimizer(t):
    """Adam on the configured schedule. Its step counter, saved in checkpoints, is the schedule's position."""
    import mlx.core as mx
    import mlx.optimizers as optim

    if t.lr_schedule == "constant" and not t.warmup_steps:
        return optim.Adam(learning_rate=t.learning_rate)
    if t.lr_schedule == "cosine":
        after = optim.cosine_decay(t.learning_rate, max(t.iters - t.warmup_steps, 1), t.min_learning_rate)
    else:
        after = lambda step: mx.array(t.learning_rate, mx.float32)  # noqa: E731
    if not t.warmup_steps:
        return optim.Adam(learning_rate=after)
    warmup = optim.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optim.Adam(learning_rate=optim.join_schedules([warmup, after], [t.warmup_steps]))


def _resume_point(cfg, paths: RunPaths, work: Path, fp: dict, force: bool):
    """The newest complete checkpoint and the fingerprint changes accepted by --force-resume,
    or the finished run's result when there is nothing left to train.

    Unfinished training (.adapters.partial/) is resumed first; without it, a finished run
    (adapters/) continues to a larger train.iters.
    """
    t = cfg.train
    finished = not work.exists()
    source = paths.adapters if finished else work
    if finished and not (paths.adapters / MANIFEST).is_file():
        raise PipelineError(f"--resume: nothing to resume in {paths.root} (no unfinished training in "
                            f"{work.name}/ and no finished adapters/). Start without --resume.")
    if not finished:
        for name in ckpt.remove_incomplete(work / CHECKPOINTS):
            click.secho(f"--resume: ignoring incomplete checkpoint {name} (no manifest; deleted)", fg="yellow")
    ckpts = ckpt.complete_checkpoints(source / CHECKPOINTS)
    if not ckpts:
        raise PipelineError(f"--resume: no complete checkpoint in {source / CHECKPOINTS} (written every "
                            f"train.save_every = {t.save_every} steps and at the end). Start without --resume.")
    last = ckpts[-1]
    if finished and last.step >= t.iters:
        click.echo(f"--resume: nothing to do, run '{cfg.run}' finished at step {last.step} "
                   f"(train.iters {t.iters}). Raise --iters to train further.")
        return TrainResult(paths.adapters, **json.loads((paths.adapters / MANIFEST).read_text())["result"])
    if last.step > t.iters:
        raise PipelineError(f"--resume: the newest checkpoint is at step {last.step}, past train.iters {t.iters}. "
                            f"Pass --iters {last.step} or more.")
    ckpt.verify_files(last)
    changes = ckpt.fingerprint_changes(last.state()["fingerprint"], fp)
    listed = "".join(f"\n  {c}" for c in changes)
    if changes and not force:
        raise PipelineError(
            f"--resume refused: checkpoint {last.path} was trained with other settings or inputs:{listed}\n"
            "Restore them, start without --resume, or pass --force-resume to continue anyway "
            "(the result is then not what an uninterrupted run would give)."
        )
    if changes:
        click.secho(f"--force-resume: continuing although{listed}", fg="yellow")
    if finished:
        click.echo(f"--resume: continuing the finished run from step {last.step} to train.iters {t.iters}")
        shutil.copytree(paths.adapters, work, ignore=shutil.ignore_patterns(MANIFEST))
        last = ckpt.Checkpoint(last.step, work / CHECKPOINTS / last.path.name)
    click.echo(f"resuming from {last.path} (step {last.step}: weights, optimizer, learning-rate schedule, "
               "random state, data order)")
    return last, changes


def _apply_lora(model, num_layers: int, lora_parameters: dict, use_dora: bool, targets: list[str]) -> None:
    """Wrap the targeted modules of the last `num_layers` layers; unknown names fail with the list."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    in_layers = set().union(*({n for n, _ in layer.named_modules()} for layer in model.layers[-num_layers:]))
    top = {n for n, _ in model.named_modules()}
    keys = [k for k in lora_parameters["keys"] if k in in_layers or k in top]
    explicit_missing = [t for t in targets if t not in ("attention", "mlp") and t not in keys]
    if "lm_head" in explicit_missing:
        raise PipelineError(
            "LoRA target 'lm_head': this model ties its output layer to the embeddings (no lm_head). "
            "Drop 'lm_head' from train.targets."
        )
    if explicit_missing or not keys:
        linear = sorted(n for n in in_layers if n.endswith(("proj", "linear")))
        raise PipelineError(
            f"LoRA target(s) {', '.join(explicit_missing or targets)} not found in this model. "
            f"Linear modules in its layers: {', '.join(linear)}."
        )
    linear_to_lora_layers(model, num_layers, dict(lora_parameters, keys=keys), use_dora=use_dora)


def _use_gpu_layers(model, dtype_name: str) -> None:
    """GPU backends: quantized layers multiply through dequantize + bf16 matmul (~2x MLX's
    quantized_matmul there) and LoRA products run in bf16 (pipeline/qlora.py). For comparisons,
    MLX_PIPELINE_QUANTIZED_MATMUL=1 keeps MLX's kernel, MLX_PIPELINE_FP32_LORA=1 mlx-lm's products."""
    from ..qlora import use_compute_dtype_lora, use_dequantized_matmul

    if not os.environ.get("MLX_PIPELINE_QUANTIZED_MATMUL") and (n := use_dequantized_matmul(model)):
        click.echo(f"QLoRA: {n} quantized layers train through dequantize + {dtype_name} matmul")
    if not os.environ.get("MLX_PIPELINE_FP32_LORA") and (n := use_compute_dtype_lora(model)):
        click.echo(f"LoRA: {n} adapters multiply in {dtype_name} (their weights and optimizer stay float32)")


def _datasets(data_dir: Path, tokenizer, t):
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    def load(split):
        rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        return rows

    train_rows, valid_rows = load("train"), load("valid")
    if len(train_rows) < t.batch_size:
        raise DataError(f"train split has {len(train_rows)} rows, fewer than train.batch_size {t.batch_size}. "
                        "Add data or lower --batch-size.")
    if len(valid_rows) < t.batch_size:
        raise DataError(f"valid split has {len(valid_rows)} rows, fewer than train.batch_size {t.batch_size}. "
                        "Add data or lower --batch-size.")
    options = types.SimpleNamespace(mask_prompt=t.mask_prompt and "text" not in train_rows[0])
    return (CacheDataset(create_dataset(train_rows, tokenizer, options)),
            CacheDataset(create_dataset(valid_rows, tokenizer, options)))


def _save_adapter(model, path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights)


def _loop(model, optimizer, train_set, valid_set, cfg, work: Path, save, resume_state: dict | None) -> list[dict]:
    """The training loop: mlx-lm's batching, loss and evaluation; our progress, log and checkpoints.

    `resume_state` (a checkpoint's state.json) restores the step, the MLX random key, the data
    order's position, the loss accumulator and the log rows, so the run continues as if it had
    not stopped. Ctrl-C / SIGTERM finish the current step, save a checkpoint and raise
    TrainingInterrupted.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.tuner.trainer import default_loss, evaluate
    from tqdm import tqdm

    t, seed, max_len = cfg.train, cfg.seed, cfg.data.max_seq_length
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, ntoks), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, ntoks

    def validate(at_step: int) -> float:
        # The validation batches are drawn from numpy's global RNG: seed it from the step, so a
        # step's validation loss does not depend on what ran before (or on a resume).
        outer = np.random.get_state()
        np.random.seed([seed % 2**32, at_step])
        model.eval()
        try:
            return evaluate(model, valid_set, t.batch_size, t.val_batches, max_seq_length=max_len)
        finally:
            model.train()
            np.random.set_state(outer)

    batches = ckpt.ResumableBatches(train_set, t.batch_size, max_len, seed)
    start_step = 0
    log: list[dict] = []
    acc = {"losses": [], "tokens": 0, "seconds": 0.0, "trained_tokens": 0}  # since the last report
    if resume_state is not None:
        start_step, log, acc = resume_state["step"], list(resume_state["log"]), dict(resume_state["accumulator"])
        batches.restore(resume_state["data_order"], check=resume_state["strict"])
        ckpt.set_mx_random_key(resume_state["mx_random_key"])
    log_path = work / "train_log.jsonl"
    write_jsonl(log_path, log)  # as of the checkpoint: rows of steps lost in a crash are dropped
    logf = open(log_path, "a")

    def record(row):
        log.append(row)
        logf.write(json.dumps(row) + "\n")
        logf.flush()

    def snapshot() -> dict:
        return {"iters": t.iters, "mx_random_key": ckpt.mx_random_key(), "data_order": batches.state(),
                "accumulator": acc, "log": log}

    model.train()
    bar = tqdm(total=t.iters, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    try:
        with _StopSignals() as stop:
            for it in range(start_step + 1, t.iters + 1):
                if it == 1 or it % t.steps_per_eval == 0 or it == t.iters:
                    val = validate(it - 1)
                    record({"step": it - 1, "val_loss": round(val, 5)})
                    bar.write(f"step {it - 1:>5}  val loss {val:.3f}")
                batch, lengths = next(batches)
                tic = time.perf_counter()
                loss, n = step(batch, lengths)
                mx.eval(state, loss, n)
                acc["seconds"] += time.perf_counter() - tic
                acc["losses"].append(loss.item())
                acc["tokens"] += n.item()
                acc["trained_tokens"] += n.item()
                peak = mx.get_peak_memory() / 1e9
                tok_s = acc["tokens"] / max(acc["seconds"], 1e-9)
                bar.set_postfix(loss=f"{acc['losses'][-1]:.3f}", tok_s=f"{tok_s:.0f}", peak=f"{peak:.2f}GB")
                bar.update(1)
                if it % t.steps_per_report == 0 or it == t.iters:
                    row = {
                        "step": it, "train_loss": round(sum(acc["losses"]) / len(acc["losses"]), 5),
                        "learning_rate": float(optimizer.learning_rate.item()),
                        "tokens_per_second": round(tok_s, 1),
                        "trained_tokens": acc["trained_tokens"], "peak_memory_gb": round(peak, 3),
                    }
                    if not math.isfinite(row["train_loss"]):
                        raise PipelineError(f"training diverged at step {it} (loss {row['train_loss']}). "
                                            "Lower --learning-rate.")
                    record(row)
                    acc.update(losses=[], tokens=0, seconds=0.0)
                stopping = stop.signum  # read once: a signal arriving later stops after the next step
                if it % t.save_every == 0 or it == t.iters or stopping:
                    saved = save(it, snapshot())
                    _save_adapter(model, work / "adapters.safetensors")
                if stopping and it < t.iters:
                    raise TrainingInterrupted(
                        f"interrupted at step {it}; checkpoint saved to {saved}; resume with "
                        "`make train RESUME=1` / `mlx-pipeline train --resume`",
                        it, saved, 128 + stopping,
                    )
    finally:
        bar.close()
        logf.close()
    return log


class _StopSignals:
    """While training: the first Ctrl-C / SIGTERM asks the loop to save and stop after the current
    step; the handlers then go back to the default action, so a second one ends the process at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)
        # os.write: a signal handler must not re-enter a buffered stream the loop may be writing.
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                    "(press Ctrl-C again to abort at once)\n".encode())

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _plot(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
