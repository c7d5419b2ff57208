"""Length-bucketed training batches: little padding, a seeded order, resumable by position.

Each epoch is a seeded permutation of the rows, cut into windows of `batch_size * window` rows;
each window is sorted by length and cut into batches, and the epoch's batches are shuffled.
Batch k depends on (seed, k) alone, so a resumed run continues at position k with the very
batches an uninterrupted run would have drawn. With `window` 1 this is a plain shuffle.
Every epoch covers every row once, less the remainder (< batch_size) of its permutation.

mlx-lm sorts the whole split once, so its batches never change between epochs, and pads each
batch to a multiple of 32 tokens; here rows meet other rows of similar length each epoch, and
a batch is padded only up to the next of 16 widths per power of two (padded_width), which keeps
the waste under 1/16 and the number of shapes the compiled step sees small.
"""

from __future__ import annotations

from dataclasses import dataclass


def padded_width(longest: int) -> int:
    """`longest` rounded up to a multiple of 2^(bits - 5): 16 widths per power of two."""
    step = 1 << max(longest.bit_length() - 5, 0)
    return -(-longest // step) * step


@dataclass
class Batch:
    tokens: object   # mx.array int32 (rows, length): the padded rows
    mask: object     # mx.array float32 (rows, length - 1): 1 where the target token is trained
    real_tokens: int  # tokens that are not padding
    positions: int    # rows x (length - 1): what the model computes on
    # The trained targets as flat positions into (rows x (length - 1)), mx.array int32 (K,), and
    # their weights (K,): 1, then 0 for the padding that rounds K like the widths (fewer compiled
    # shapes). The loss needs logits only there (pipeline/trainer.py: masked_loss).
    trained: object = None
    weight: object = None


def epoch_plan(lengths: list[int], batch_size: int, window: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch."""
    import numpy as np

    rng = np.random.default_rng([seed % 2**32, epoch])
    order = rng.permutation(len(lengths))
    size = batch_size * window
    batches = []
    for start in range(0, len(order), size):
        part = sorted(order[start:start + size], key=lambda i: lengths[i])  # stable: ties keep the shuffle
        batches += [[int(i) for i in part[j:j + batch_size]] for j in range(0, len(part), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketedBatches:
    """Batch k of the training split (`position` counts the batches drawn), as row indices."""

    def __init__(self, lengths: list[int], batch_size: int, window: int, seed: int):
        if len(lengths) < batch_size:
            raise ValueError(f"{len(lengths)} rows, fewer than the batch size {batch_size}")
        self.lengths, self.batch_size, self.window, self.seed = lengths, batch_size, window, seed
        self.position = 0
        self._epoch, self._plan = -1, []

    def per_epoch(self) -> int:
        return len(self.lengths) // self.batch_size

    def batch(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch())
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, epoch_plan(self.lengths, self.batch_size, self.window, self.seed, epoch)
        return self._plan[index]

    def next(self) -> list[int]:
        rows = self.batch(self.position)
        self.position += 1
        return rows

    def state(self) -> dict:
        return {"position": self.position, "window": self.window, "rows": len(self.lengths)}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])


def validation_batches(lengths: list[int], batch_size: int, count: int) -> list[list[int]]:
    """The same batches at every validation (so losses compare across steps): the split sorted by
    length and cut into batches, `count` of them spread over the lengths (-1: all, the last one
    possibly short)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    if count == -1 or count >= len(batches):
        return batches
    step = len(batches) / count
    return [batches[int(i * step)] for i in range(count)]


def collate(encoded: list, rows: list[int], max_length: int) -> Batch:
    """Pad the rows (pipeline.data.trained_tokens.Encoded) to one length; the mask marks trained targets."""
    import mlx.core as mx
    import numpy as np

    seqs = [(encoded[i].ids[:max_length], encoded[i].mask[:max_length]) for i in rows]
    longest = max(len(ids) for ids, _ in seqs)
    # The model sees all tokens but the last: round that length, so a batch of 1024-token rows runs
    # at 1024 inputs, not 1023 (one step of MLX on an H200: 57 ms against 117 ms, bench/GPU.md).
    width = min(padded_width(max(longest - 1, 1)), max(max_length, longest)) + 1
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for r, (ids, m) in enumerate(seqs):
        tokens[r, :len(ids)] = ids
        mask[r, :len(m)] = m
    real = sum(len(ids) for ids, _ in seqs)
    targets = mask[:, 1:]
    trained = np.flatnonzero(targets).astype(np.int32)
    k = min(padded_width(max(len(trained), 1)), targets.size)
    weight = np.zeros(k, np.float32)
    weight[: len(trained)] = 1.0
    trained = np.concatenate([trained, np.zeros(k - len(trained), np.int32)])
    return Batch(mx.array(tokens), mx.array(targets), real - len(seqs), len(seqs) * (width - 1),
                 mx.array(trained), mx.array(weight))


def rank_share(rows: list[int], rank: int, size: int) -> list[int]:
    """This rank's rows of a global batch (every size-th row): the ranks together see the batch once."""
    return rows[rank::size]
