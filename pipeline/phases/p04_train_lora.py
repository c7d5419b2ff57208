"""04 Train a LoRA / DoRA adapter (or fully fine-tune) with mlx-lm's tuner.

QLoRA trains on the quantized base. On the CPU backend the quantized layers are replaced by
dense layers holding their dequantized values (same function, BLAS speed, see
modeling.dequantize_layers); the adapter then loads unchanged onto the quantized model.
Work happens in models/<run>/.adapters.partial/ and is moved to adapters/ when complete.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click

from .. import arch
from ..errors import DataError, PipelineError
from ..fsio import atomic_path, replace_dir, write_json
from ..manifest import read_manifest, write_manifest
from ..paths import RunPaths
from ..runtime import backend_name, compute_dtype
from .common import done, start_phase

CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    adapter_dir: Path
    final_train_loss: float
    final_val_loss: float | None
    first_val_loss: float | None
    parameters: dict
    tokens_per_second: float
    peak_memory_gb: float


def train_lora(cfg, resume: bool = False) -> TrainResult:
    import mlx.core as mx
    import mlx.optimizers as optim
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
    params = count_parameters(model)
    click.echo(
        f"parameters: total {params['total']:,} | trainable {params['trainable']:,} "
        f"({params['trainable_percent']:.3f}%) | frozen {params['frozen']:,}"
    )

    train_set, valid_set = _datasets(paths.data, tokenizer, t)
    work = paths.root / ".adapters.partial"
    start_step = _resume_step(model, work) if resume else 0
    if not resume and work.exists():
        shutil.rmtree(work)
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
        "compute_dtype": str(compute_dtype(t.compute_dtype)).replace("mlx.core.", ""),
        "seed": cfg.seed,
    }
    write_json(work / "adapter_config.json", adapter_config)

    optimizer = optim.Adam(learning_rate=t.learning_rate)
    log = _loop(model, optimizer, train_set, valid_set, t, work, start_step, cfg.seed, cfg.data.max_seq_length)

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
    write_manifest(
        work, "04_train_lora", cfg, started,
        inputs={
            "base": adapter_config["base_model"],
            "data": {k: v.get("sha256") for k, v in data_manifest["outputs"].items()},
        },
        outputs={"adapter": str(paths.adapters / "adapters.safetensors"), "log": "train_log.jsonl", "plot": "loss.png"},
        backend=backend_name(),
        result=result,
        resumed_from_step=start_step,
    )
    replace_dir(work, paths.adapters)
    done(
        f"adapter ready: {paths.adapters}/adapters.safetensors "
        f"(val loss {result['first_val_loss']} -> {result['final_val_loss']}; loss curve {paths.adapters}/loss.png)"
    )
    return TrainResult(paths.adapters, **result)


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


def _datasets(data_dir: Path, tokenizer, t):
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    def load(split):
        rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        return rows

    train_rows, valid_rows = load("train"), load("valid")
    if len(train_rows) < t.batch_size:
        raise DataError(f"train split has {len(train_rows)} rows, fewer than train.batch_size {t.batch_size}. Add data or lower --batch-size.")
    if len(valid_rows) < t.batch_size:
        raise DataError(f"valid split has {len(valid_rows)} rows, fewer than train.batch_size {t.batch_size}. Add data or lower --batch-size.")
    options = types.SimpleNamespace(mask_prompt=t.mask_prompt and "text" not in train_rows[0])
    return (CacheDataset(create_dataset(train_rows, tokenizer, options)),
            CacheDataset(create_dataset(valid_rows, tokenizer, options)))


def _resume_step(model, work: Path) -> int:
    ckpts = sorted((work / CHECKPOINTS).glob("*_adapters.safetensors")) if work.exists() else []
    if not ckpts:
        raise PipelineError(f"--resume: no checkpoint in {work / CHECKPOINTS}. Start without --resume.")
    click.echo(f"resuming from {ckpts[-1].name} (adapter weights; optimizer state starts fresh)")
    model.load_weights(str(ckpts[-1]), strict=False)
    return int(ckpts[-1].name.split("_")[0])


def _save_adapter(model, path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights)


def _loop(model, optimizer, train_set, valid_set, t, work: Path, start_step: int, seed: int, max_len: int) -> list[dict]:
    """The training loop: mlx-lm's batching, loss and evaluation; our progress, log and checkpoints."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches
    from tqdm import tqdm

    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, ntoks), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, ntoks

    def validate():
        model.eval()
        loss = evaluate(model, valid_set, t.batch_size, t.val_batches, max_seq_length=max_len)
        model.train()
        return loss

    log: list[dict] = []
    log_path = work / "train_log.jsonl"
    logf = open(log_path, "a" if start_step else "w")

    def record(row):
        log.append(row)
        logf.write(json.dumps(row) + "\n")
        logf.flush()

    batches = iterate_batches(train_set, t.batch_size, max_len, loop=True, seed=seed)
    for _ in range(start_step):  # keep the data order of an uninterrupted run
        next(batches)
    model.train()
    losses, ntoks, elapsed, trained = [], 0, 0.0, 0
    bar = tqdm(total=t.iters, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    for it in range(start_step + 1, t.iters + 1):
        if it == start_step + 1 or it % t.steps_per_eval == 0 or it == t.iters:
            val = validate()
            record({"step": it - 1, "val_loss": round(val, 5)})
            bar.write(f"step {it - 1:>5}  val loss {val:.3f}")
        batch, lengths = next(batches)
        tic = time.perf_counter()
        loss, n = step(batch, lengths)
        mx.eval(state, loss, n)
        elapsed += time.perf_counter() - tic
        losses.append(loss.item())
        ntoks += n.item()
        trained += n.item()
        peak = mx.get_peak_memory() / 1e9
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{ntoks / max(elapsed, 1e-9):.0f}", peak=f"{peak:.2f}GB")
        bar.update(1)
        if it % t.steps_per_report == 0 or it == t.iters:
            row = {
                "step": it, "train_loss": round(sum(losses) / len(losses), 5),
                "learning_rate": float(optimizer.learning_rate.item()),
                "tokens_per_second": round(ntoks / max(elapsed, 1e-9), 1),
                "trained_tokens": trained, "peak_memory_gb": round(peak, 3),
            }
            if not math.isfinite(row["train_loss"]):
                raise PipelineError(f"training diverged at step {it} (loss {row['train_loss']}). Lower --learning-rate.")
            record(row)
            losses, ntoks, elapsed = [], 0, 0.0
        if it % t.save_every == 0 or it == t.iters:
            _save_adapter(model, work / "adapters.safetensors")
            if it % t.save_every == 0:
                _save_adapter(model, work / CHECKPOINTS / f"{it:07d}_adapters.safetensors")
    bar.close()
    logf.close()
    return log


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
