"""04 Train a LoRA / DoRA adapter (or fully fine-tune) with mlx-lm's tuner.

QLoRA trains on the quantized base. On the CPU backend the quantized layers are replaced by
dense layers holding their dequantized values (same function, BLAS speed, see
modeling.dequantize_layers); the adapter then loads unchanged onto the quantized model.
Work happens in models/<run>/.adapters.partial/ and is moved to adapters/ when complete.

The loop itself (loss on the trained tokens of train.mask, bucketed batches, accumulation,
ranks, best adapter, early stopping) is pipeline/trainer.py. Every train.save_every steps (and at
the end) a complete checkpoint is written to checkpoints/step-NNNNNNN/ (pipeline/checkpoints.py);
`resume=True` continues from the newest one exactly. The adapter with the lowest validation loss
is kept in adapters/best/ (train.keep_best). With train.nproc > 1 or train.hosts the phase runs
itself under mlx.launch (pipeline/distributed.py); rank 0 writes every file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import click

from .. import arch
from .. import checkpoints as ckpt
from ..checkpoints import CHECKPOINTS
from ..errors import DataError, PipelineError
from ..fsio import atomic_path, replace_dir, sha256_file, write_bytes, write_json
from ..manifest import MANIFEST, read_manifest, write_manifest
from ..paths import BEST, RunPaths
from ..plots import loss_curves
from ..runtime import backend_name, compute_dtype, is_cpu
from ..trainer import Ranks, TrainingInterrupted, echo_counts, train_loop
from .common import done, start_phase

__all__ = ["TrainResult", "TrainingInterrupted", "train_lora"]


@dataclass
class TrainResult:
    adapter_dir: Path
    final_train_loss: float
    final_val_loss: float | None
    first_val_loss: float | None
    parameters: dict
    tokens_per_second: float
    peak_memory_gb: float
    best: dict | None = None
    stopped_early: dict | None = None


def train_lora(cfg, resume: bool = False, force_resume: bool = False, paths: RunPaths | None = None) -> TrainResult:
    """`paths`: where to read the base and data and write adapters/ (a sweep trial's folder); default the run's."""
    import mlx.core as mx
    import numpy as np

    from ..modeling import count_parameters, load_model

    if (cfg.train.nproc > 1 or cfg.train.hosts) and "MLX_RANK" not in os.environ:
        if paths is not None:
            raise PipelineError("data-parallel training (train.nproc > 1, train.hosts) writes the run's own "
                                "adapters/ only; set train.nproc: 1 here.")
        from ..distributed import launch_training

        return TrainResult(**launch_training(cfg, resume, force_resume))
    ranks = Ranks()
    started = start_phase(cfg, "04 train", ["quantize", "train"]) if ranks.main else 0.0
    paths = paths or RunPaths(cfg)
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
    for turn in (0, 1) if ranks.size > 1 else (0,):  # rank 0 prepares the folder, then the others read it
        if (turn == 0) == ranks.main:
            if resume:
                found = _resume_point(cfg, paths, work, fp, force_resume, quiet=not ranks.main)
                if not isinstance(found, TrainResult):
                    start, forced = found
            elif work.exists():
                shutil.rmtree(work)
        if ranks.size > 1:
            ranks.barrier()
    if resume and isinstance(found, TrainResult):
        return found

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
    if ranks.main:
        click.echo(
            f"parameters: total {params['total']:,} | trainable {params['trainable']:,} "
            f"({params['trainable_percent']:.3f}%) | frozen {params['frozen']:,}"
        )

    train_enc, valid_enc = _datasets(paths.data, tokenizer, t)
    counts = {"train": echo_counts("train", train_enc), "valid": echo_counts("valid", valid_enc)}
    if ranks.size > 1 and ranks.main:
        click.echo(f"data-parallel: {ranks.size} ranks, {t.batch_size // ranks.size} rows each per batch "
                   f"(global batch {t.batch_size})")
    if t.grad_accumulation_steps > 1 and ranks.main:
        click.echo(f"gradient accumulation: {t.grad_accumulation_steps} batches of {t.batch_size} per step "
                   f"({t.grad_accumulation_steps * t.batch_size} rows)")
    if ranks.main:
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
    if ranks.main:
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
    def save_best(step: int, val_loss: float) -> None:
        with atomic_path(work / BEST) as tmp:
            tmp.mkdir()
            _save_adapter(model, tmp / "adapters.safetensors")
            shutil.copy2(work / "adapter_config.json", tmp / "adapter_config.json")
            write_json(tmp / "best.json", {"step": step, "val_loss": round(val_loss, 5)})

    out = train_loop(model, optimizer, train_enc, valid_enc, cfg, work, save, save_best, resume_state, ranks)
    if not ranks.main:
        return TrainResult(paths.adapters, float("nan"), None, None, params, 0.0, 0.0)
    log = out.log
    _save_adapter(model, work / "adapters.safetensors")
    if not t.keep_best and (work / BEST).exists():
        shutil.rmtree(work / BEST)  # a resumed run that turned keep_best off
    png = loss_curves(log, out.best["step"] if out.best else None)
    if png:
        write_bytes(work / "loss.png", png)
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
        best=out.best,
        stopped_early=out.stopped_early,
    )
    extra = {"forced_resume_changes": forced} if forced else {}
    best_output = {}
    if out.best:
        best_output = {"best": {"path": str(paths.adapters / BEST / "adapters.safetensors"),
                                "sha256": sha256_file(work / BEST / "adapters.safetensors"), **out.best}}
    write_manifest(
        work, "04_train_lora", cfg, started,
        inputs=inputs,
        outputs={"adapter": str(paths.adapters / "adapters.safetensors"), "log": "train_log.jsonl", "plot": "loss.png",
                 "checkpoints": [c.path.name for c in ckpt.complete_checkpoints(work / CHECKPOINTS)],
                 # checked by read_manifest when 05/07 read the adapter (pipeline/manifest.py)
                 "adapter_file": {"path": str(paths.adapters / "adapters.safetensors"),
                                  "sha256": sha256_file(work / "adapters.safetensors")},
                 **best_output},
        backend=backend_name(),
        ranks=ranks.size,
        data=counts,
        result=result,
        resumed_from_step=start.step if start is not None else 0,
        **extra,
    )
    replace_dir(work, paths.adapters)
    best = (f"; best: step {out.best['step']} (val loss {out.best['val_loss']}) in {paths.adapters / BEST}/, "
            "used by 05-10 (ADAPTER=last: the last step)") if out.best else ""
    if out.best and out.best["step"] == 0:
        click.secho("warning: no step beat the base model's validation loss; adapters/best/ is the untrained "
                    "adapter (the base). Check the learning rate and the data.", fg="yellow")
    done(
        f"adapter ready: {paths.adapters}/adapters.safetensors "
        f"(val loss {result['first_val_loss']} -> {result['final_val_loss']}{best}; "
        f"loss curve {paths.adapters}/loss.png)"
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


def _resume_point(cfg, paths: RunPaths, work: Path, fp: dict, force: bool, quiet: bool = False):
    """The newest complete checkpoint and the fingerprint changes accepted by --force-resume,
    or the finished run's result when there is nothing left to train.

    Unfinished training (.adapters.partial/) is resumed first; without it, a finished run
    (adapters/) continues to a larger train.iters.
    """
    t = cfg.train
    echo = (lambda *a, **k: None) if quiet else click.echo  # noqa: E731
    secho = (lambda *a, **k: None) if quiet else click.secho  # noqa: E731
    finished = not work.exists()
    source = paths.adapters if finished else work
    if finished and not (paths.adapters / MANIFEST).is_file():
        raise PipelineError(f"--resume: nothing to resume in {paths.root} (no unfinished training in "
                            f"{work.name}/ and no finished adapters/). Start without --resume.")
    if not finished:
        for name in ckpt.remove_incomplete(work / CHECKPOINTS):
            secho(f"--resume: ignoring incomplete checkpoint {name} (no manifest; deleted)", fg="yellow")
    ckpts = ckpt.complete_checkpoints(source / CHECKPOINTS)
    if not ckpts:
        raise PipelineError(f"--resume: no complete checkpoint in {source / CHECKPOINTS} (written every "
                            f"train.save_every = {t.save_every} steps and at the end). Start without --resume.")
    last = ckpts[-1]
    if finished and last.step >= t.iters:
        echo(f"--resume: nothing to do, run '{cfg.run}' finished at step {last.step} "
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
        secho(f"--force-resume: continuing although{listed}", fg="yellow")
    if finished:
        echo(f"--resume: continuing the finished run from step {last.step} to train.iters {t.iters}")
        shutil.copytree(paths.adapters, work, ignore=shutil.ignore_patterns(MANIFEST))
        last = ckpt.Checkpoint(last.step, work / CHECKPOINTS / last.path.name)
    echo(f"resuming from {last.path} (step {last.step}: weights, optimizer, learning-rate schedule, "
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
    """The train and valid splits tokenized, with the trained tokens of train.mask marked."""
    from ..data.trained_tokens import encode_rows

    def load(split):
        return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]

    train_rows, valid_rows = load("train"), load("valid")
    if len(train_rows) < t.batch_size:
        raise DataError(f"train split has {len(train_rows)} rows, fewer than train.batch_size {t.batch_size}. "
                        "Add data or lower --batch-size.")
    if len(valid_rows) < t.batch_size:
        raise DataError(f"valid split has {len(valid_rows)} rows, fewer than train.batch_size {t.batch_size}. "
                        "Add data or lower --batch-size.")
    return encode_rows(train_rows, tokenizer, t.mask), encode_rows(valid_rows, tokenizer, t.mask)


def _save_adapter(model, path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights)
