"""The training loop of 04: loss on the trained tokens only, length-bucketed batches, gradient
accumulation, data-parallel ranks, validation that keeps the best adapter and stops early.

The loss of a step is the sum of the cross-entropy over every trained token of its batches (all
accumulation batches, all ranks) divided by their number: splitting a batch across ranks or
accumulation batches changes only the order of float additions, not the step.

`resume_state` (a checkpoint's state.json) restores the step, the MLX random keys, the batch
position, the loss accumulator, the log, and the best validation loss, so the run continues as
if it had not stopped. Ctrl-C / SIGTERM finish the current step, save a checkpoint and raise
TrainingInterrupted; with several ranks they agree on the step to stop at.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import click

from . import checkpoints as ckpt
from .batching import BucketedBatches, collate, rank_share, validation_batches
from .errors import PipelineError
from .fsio import write_jsonl
from .progress import Eta


class TrainingInterrupted(PipelineError):
    """Ctrl-C or SIGTERM stopped training after a step; a complete checkpoint was saved.

    The CLI exits with `exit_code` (128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, step: int, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.step, self.checkpoint, self.exit_code = step, checkpoint, exit_code


class Ranks:
    """The data-parallel group: one process, or the ranks mlx.launch started (MLX_RANK is set)."""

    def __init__(self):
        import mlx.core as mx

        self.group = mx.distributed.init() if "MLX_RANK" in os.environ else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x):
        import mlx.core as mx

        return mx.distributed.all_sum(x, group=self.group) if self.size > 1 else x

    def barrier(self) -> None:
        import mlx.core as mx

        mx.eval(self.sum(mx.array(0.0)))


@dataclass
class LoopResult:
    log: list[dict]
    best: dict | None = None            # {"step", "val_loss"} of adapters/best/
    stopped_early: dict | None = None   # {"step", "best_step", "patience"}
    counts: dict = field(default_factory=dict)


def masked_loss(model, tokens, mask, trained, weight):
    """(sum of the cross-entropy over the trained targets, their number). `mask`: 1 at each trained
    target; `trained`: their flat positions in (rows x (length - 1)) and `weight` 1 for each (0 for
    padding), as collate makes them. When they cover every position (nothing masked, e.g. plain
    text), the logits of all positions are computed, as before: the gather would only add work."""
    import mlx.core as mx
    import mlx.nn as nn

    if trained.size >= mask.size:
        ce = nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).astype(mx.float32) * mask
        return ce.sum(), mask.sum()
    logits = logits_at(model, tokens[:, :-1], trained)
    targets = tokens[:, 1:].reshape(-1)[trained]
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32) * weight
    return ce.sum(), weight.sum()


class _Gathered:
    """Stands in for a mlx-lm model's decoder (`model.model`) during one call: the decoder's hidden
    states at the flat positions only, so that the model's own head (tied or not, scaled or not)
    runs on those alone. Attribute reads (`embed_tokens` of a tied head) go to the decoder."""

    def __init__(self, decoder, positions):
        self.decoder, self.positions = decoder, positions

    def __call__(self, *args, **kwargs):
        hidden = self.decoder(*args, **kwargs)
        return hidden.reshape(-1, hidden.shape[-1])[self.positions][None]

    def __getattr__(self, name):
        return getattr(self.decoder, name)


def logits_at(model, inputs, positions):
    """The logits of a mlx-lm model at flat positions of (rows x length) inputs only, (K, vocab).
    The head is a large part of a step (49 k x 576 of SmolLM2's 135 M parameters, 128 k x 2048 of a
    1 B Llama 3) and the loss needs it only on the trained targets: masked prompts and padding skip it."""
    decoder = model["model"]
    dict.__setitem__(model, "model", _Gathered(decoder, positions))  # not Module.__setattr__: no new parameters
    try:
        return model(inputs)[0]
    finally:
        dict.__setitem__(model, "model", decoder)


def evaluate(model, encoded: list, batches: list[list[int]], max_length: int, ranks: Ranks | None = None) -> float:
    """Mean loss per trained token over `batches` (row indices into `encoded`), split across ranks."""
    import mlx.core as mx

    ranks = ranks or Ranks()
    total = mx.array([0.0, 0.0])
    for rows in batches:
        mine = rank_share(rows, ranks.rank, ranks.size)
        if mine:
            b = collate(encoded, mine, max_length)
            loss, n = masked_loss(model, b.tokens, b.mask, b.trained, b.weight)
            total = total + mx.stack([loss, n.astype(mx.float32)])
            mx.eval(total)
    loss, n = ranks.sum(total).tolist()
    return loss / n if n else float("nan")


def train_loop(model, optimizer, train_enc: list, valid_enc: list, cfg, work: Path, save, save_best,
               resume_state: dict | None, ranks: Ranks) -> LoopResult:
    """Run train.iters optimizer steps (from the resumed one); `save(step, state)` writes a
    checkpoint and `save_best(step, val_loss)` the best adapter (both called on rank 0 only)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map
    from tqdm import tqdm

    t, max_len = cfg.train, cfg.data.max_seq_length
    if t.batch_size % ranks.size:
        raise PipelineError(f"train.batch_size {t.batch_size} does not split over {ranks.size} ranks: "
                            f"use a multiple of {ranks.size}.")
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    grad_state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=grad_state, outputs=grad_state)
    def gradients(tokens, mask, trained, weight):
        (loss, n), grads = loss_and_grad(model, tokens, mask, trained, weight)
        return loss, n, grads

    update_state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=update_state, outputs=update_state)
    def update(grads, scale):
        optimizer.update(model, tree_map(lambda g: g * scale.astype(g.dtype), grads))

    # One step = one global batch of batch_size x accumulation rows, split over the ranks, then
    # into accumulation batches: the same rows per step however the work is split.
    accumulate = t.grad_accumulation_steps
    batches = BucketedBatches([len(e.ids) for e in train_enc], t.batch_size * accumulate, t.bucket_window, cfg.seed)
    per_micro = t.batch_size // ranks.size
    val_plan = validation_batches([len(e.ids) for e in valid_enc], t.batch_size, t.val_batches)

    def validate() -> float:
        model.eval()
        try:
            return evaluate(model, valid_enc, val_plan, max_len, ranks)
        finally:
            model.train()

    start = 0
    log: list[dict] = []
    acc = {"losses": [], "tokens": 0, "trained_tokens_window": 0, "positions": 0, "seconds": 0.0,
           "trained_tokens": 0}
    best = {"val_loss": None, "step": None, "evals_since": 0}
    if resume_state is not None:
        start, log = resume_state["step"], list(resume_state["log"])
        acc.update(resume_state["accumulator"])
        best.update(resume_state.get("best") or {})
        batches.restore(resume_state["data_order"])
        keys = resume_state.get("mx_random_keys") or [resume_state["mx_random_key"]]
        ckpt.set_mx_random_key(keys[ranks.rank] if len(keys) == ranks.size else keys[0])
    elif ranks.size > 1:
        mx.random.seed(cfg.seed + ranks.rank)  # ranks draw other dropout masks, as other rows would

    log_path = work / "train_log.jsonl"
    logf = None
    if ranks.main:
        write_jsonl(log_path, log)  # as of the checkpoint: rows of steps lost in a crash are dropped
        logf = open(log_path, "a")

    def record(row):
        log.append(row)
        if logf:
            logf.write(json.dumps(row) + "\n")
            logf.flush()

    def random_keys() -> list[list[int]]:
        if ranks.size == 1:
            return [ckpt.mx_random_key()]
        mine = mx.zeros((ranks.size, 2), mx.uint32)
        mine[ranks.rank] = mx.array(ckpt.mx_random_key(), mx.uint32)
        return [[int(v) for v in row] for row in ranks.sum(mine).tolist()]

    def snapshot() -> dict:
        keys = random_keys()
        return {"iters": t.iters, "mx_random_key": keys[0], "mx_random_keys": keys, "data_order": batches.state(),
                "accumulator": acc, "log": log, "best": best, "ranks": ranks.size}

    def validation(step: int, bar) -> bool:
        """Validate at `step`; keep the best adapter; True when early stopping ends the run."""
        val = validate()
        improved = best["val_loss"] is None or val < best["val_loss"]
        record({"step": step, "val_loss": round(val, 5), **({"best": True} if improved and t.keep_best else {})})
        if improved:
            best.update(val_loss=val, step=step, evals_since=0)
            if t.keep_best and ranks.main:
                save_best(step, val)
        else:
            best["evals_since"] += 1
        if ranks.main:  # tqdm.write prints even from a disabled bar
            bar.write(f"step {step:>5}  val loss {val:.3f}" + ("  (best)" if improved and step else ""))
        return bool(t.early_stopping_patience) and best["evals_since"] >= t.early_stopping_patience

    model.train()
    # Our own ETA in place of tqdm's: its estimate counts the compile of the first step and validation.
    bar = tqdm(total=t.iters, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not ranks.main,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
    eta = Eta(t.iters, done=start)

    def validations_left(step: int) -> int:  # at every steps_per_eval-th step and the last
        every = t.steps_per_eval
        return max(t.iters // every - step // every + (1 if t.iters % every else 0), 0) if step < t.iters else 0

    stopped_early = None
    try:
        with _StopSignals() as stop:
            if start == 0:
                tic = time.perf_counter()
                validation(0, bar)  # the base's loss: the adapter must beat it to be kept as best
                eta.pause(time.perf_counter() - tic)
            for it in range(start + 1, t.iters + 1):
                tic = time.perf_counter()
                grads, totals = None, mx.array([0.0, 0.0, 0.0, 0.0])
                mine = rank_share(batches.next(), ranks.rank, ranks.size)
                for m in range(accumulate):
                    b = collate(train_enc, mine[m * per_micro:(m + 1) * per_micro], max_len)
                    loss, n, g = gradients(b.tokens, b.mask, b.trained, b.weight)
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                    totals = totals + mx.stack([loss, n.astype(mx.float32), mx.array(float(b.real_tokens)),
                                                mx.array(float(b.positions))])
                    if m < accumulate - 1:
                        mx.eval(grads, totals)
                # The last batch's gradients, the sums over ranks and the update are queued as one
                # graph with no host sync in between (scale stays on the GPU): a totals.tolist()
                # before update() left the GPU idle while the host queued it (~5 % of a step on an H200).
                if ranks.size > 1:
                    stop_flag = mx.array([float(stop.signum or 0)])
                    totals = ranks.sum(mx.concatenate([totals, stop_flag]))
                    grads = average_gradients(grads, group=ranks.group)
                    scale = ranks.size / mx.maximum(totals[1], 1.0)
                else:
                    scale = 1.0 / mx.maximum(totals[1], 1.0)
                update(grads, scale)
                mx.eval(model.state, optimizer.state, totals)
                if ranks.size > 1:
                    loss_sum, n, real, positions, stopping = totals.tolist()
                    stopping = int(stopping and (stop.signum or signal.SIGTERM))
                else:
                    loss_sum, n, real, positions = totals.tolist()
                    stopping = stop.signum
                acc["seconds"] += time.perf_counter() - tic
                eta.step(time.perf_counter() - tic)
                acc["losses"].append(loss_sum / max(n, 1.0))
                acc["tokens"] += int(real)
                acc["positions"] += int(positions)
                acc["trained_tokens_window"] += int(n)
                acc["trained_tokens"] += int(n)
                peak = mx.get_peak_memory() / 1e9
                tok_s = acc["tokens"] / max(acc["seconds"], 1e-9)
                padding = 100.0 * (1 - acc["tokens"] / max(acc["positions"], 1))
                bar.set_postfix_str(f"{eta.text(validations_left(it))}, loss={acc['losses'][-1]:.3f}, "
                                    f"tok/s={tok_s:.0f}, pad={padding:.0f}%, peak={peak:.2f}GB")
                bar.update(1)
                if it % t.steps_per_report == 0 or it == t.iters:
                    row = {
                        "step": it, "train_loss": round(sum(acc["losses"]) / len(acc["losses"]), 5),
                        "learning_rate": float(optimizer.learning_rate.item()),
                        "tokens_per_second": round(tok_s, 1),
                        "trained_tokens_per_second": round(acc["trained_tokens_window"] / max(acc["seconds"], 1e-9), 1),
                        "padding_percent": round(padding, 2),
                        "trained_tokens": acc["trained_tokens"], "peak_memory_gb": round(peak, 3),
                    }
                    if not math.isfinite(row["train_loss"]):
                        raise PipelineError(f"training diverged at step {it} (loss {row['train_loss']}). "
                                            "Lower --learning-rate.")
                    record(row)
                    acc.update(losses=[], tokens=0, positions=0, trained_tokens_window=0, seconds=0.0)
                validating = it % t.steps_per_eval == 0 or it == t.iters
                tic = time.perf_counter()
                if validating and validation(it, bar) and it < t.iters:
                    stopped_early = {"step": it, "best_step": best["step"], "patience": t.early_stopping_patience}
                    if ranks.main:
                        bar.write(f"early stopping at step {it}: no lower validation loss in "
                                  f"{t.early_stopping_patience} validations (best {best['val_loss']:.3f} at step "
                                  f"{best['step']})")
                if validating:
                    eta.pause(time.perf_counter() - tic)
                state = snapshot() if (it % t.save_every == 0 or it == t.iters or stopping or stopped_early) else None
                if state is not None and ranks.main:
                    saved = save(it, state)
                if stopping and it < t.iters and not stopped_early:
                    raise TrainingInterrupted(
                        f"interrupted at step {it}; checkpoint saved to {saved if ranks.main else 'rank 0'}; "
                        "resume with `make train RESUME=1` / `mlx-pipeline train --resume`",
                        it, saved if ranks.main else work, 128 + stopping,
                    )
                if stopped_early:
                    break
    except RuntimeError as e:
        if ranks.size > 1 and "peer" in str(e):
            raise PipelineError(f"rank {ranks.rank}: lost the connection to another rank ({e}). Another rank "
                                "stopped or was killed; resume from the newest checkpoint with --resume.") from None
        raise
    finally:
        bar.close()
        if logf:
            logf.close()
    kept = {"step": best["step"], "val_loss": round(best["val_loss"], 5)} if best["val_loss"] is not None else None
    return LoopResult(log, kept if t.keep_best else None, stopped_early)


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


def echo_counts(name: str, encoded: list) -> dict:
    """Trained and masked tokens of a split, printed once at the start."""
    trained = sum(sum(e.mask) for e in encoded)
    total = sum(len(e.ids) for e in encoded)
    click.echo(f"{name}: {len(encoded)} rows, {total:,} tokens, {trained:,} trained "
               f"({100 * trained / max(total, 1):.1f}%)")
    return {"rows": len(encoded), "tokens": total, "trained_tokens": trained}
