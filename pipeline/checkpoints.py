"""Resumable training checkpoints and the training state they restore exactly.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` in the run's work folder:

    adapters.safetensors    the trainable weights (with adapter_config.json, mlx-lm loads the folder)
    adapter_config.json
    optimizer.safetensors   tree_flatten(optimizer.state): Adam's moments, its step counter (which
                            is the learning-rate schedule's position) and the current learning rate
    state.json              step, MLX random keys (one per rank), the batch position, the loss
                            accumulator, the train log so far, the best validation loss, and the
                            run's fingerprint
    manifest.json           written last: a checkpoint is complete only when it has one

It is written as `checkpoints/.step-NNNNNNN.tmp-<pid>.tmp/` and renamed when complete, so a crash
leaves either a complete checkpoint or a temporary folder that resume deletes.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError
from .fsio import atomic_path, sha256_file, write_json
from .manifest import MANIFEST, write_manifest

CHECKPOINTS = "checkpoints"
STATE = "state.json"
WEIGHTS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
_NAME = re.compile(r"^step-(\d{7,})$")

# Config keys that change the training trajectory: resuming with another value is refused
# unless forced. Others (iters with a constant schedule, report/eval/save intervals,
# val_batches, keep_checkpoints, grad_checkpoint) may change between the two halves of a run.
TRAJECTORY_KEYS = [
    "seed", "quantize.enabled", "data.max_seq_length",
    "train.fine_tune_type", "train.rank", "train.alpha", "train.dropout", "train.targets",
    "train.num_layers", "train.batch_size", "train.learning_rate", "train.lr_schedule",
    "train.warmup_steps", "train.min_learning_rate", "train.mask", "train.bucket_window",
    "train.grad_accumulation_steps",
]
DATA_FILES = ["train.jsonl", "valid.jsonl"]


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


@dataclass
class Checkpoint:
    step: int
    path: Path

    def state(self) -> dict:
        return json.loads((self.path / STATE).read_text())


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under `root` (named step-N and holding a manifest), oldest first."""
    out = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            out.append(Checkpoint(int(m.group(1)), p))
    return sorted(out, key=lambda c: c.step)


def remove_incomplete(root: Path) -> list[str]:
    """Delete temporary checkpoint folders and step-N folders without a manifest; return their names."""
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        temporary = p.name.startswith(".step-")
        unfinished = _NAME.match(p.name) and not (p / MANIFEST).is_file()
        if p.is_dir() and (temporary or unfinished):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0: all)."""
    if keep > 0:
        for c in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(c.path, ignore_errors=True)


# --- fingerprint: what a checkpoint was trained on ------------------------------------------


def fingerprint(cfg, base_content_hash: str, data_dir: Path, dtype_name: str) -> dict:
    """The settings and inputs that determine a run's trajectory (compared on resume)."""
    config = {k: cfg.get(k) for k in TRAJECTORY_KEYS}
    config["train.compute_dtype (resolved)"] = dtype_name
    if cfg.train.lr_schedule != "constant":
        config["train.iters"] = cfg.train.iters  # the cosine decay runs to train.iters
    return {
        "config": config,
        "base_content_hash": base_content_hash,
        "data_sha256": {f: sha256_file(data_dir / f) for f in DATA_FILES},
    }


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences: 'train.learning_rate: 0.001 -> 0.002', 'data file ...'."""
    changes = []
    for k in sorted(set(old["config"]) | set(new["config"])):
        a, b = old["config"].get(k, "(unset)"), new["config"].get(k, "(unset)")
        if a != b:
            changes.append(f"{k}: {a!r} -> {b!r}")
    if old["base_content_hash"] != new["base_content_hash"]:
        changes.append(f"base model content hash: {old['base_content_hash'][:12]} -> {new['base_content_hash'][:12]}")
    for f in sorted(set(old["data_sha256"]) | set(new["data_sha256"])):
        a, b = old["data_sha256"].get(f), new["data_sha256"].get(f)
        if a != b:
            changes.append(f"data file {f}: sha256 {str(a)[:12]} -> {str(b)[:12]}")
    return changes


# --- random state --------------------------------------------------------------------------


def mx_random_key() -> list[int]:
    import mlx.core as mx

    return [int(v) for v in mx.random.state[0].tolist()]


def set_mx_random_key(key: list[int]) -> None:
    """Restore MLX's global PRNG key (two uint32); mx.random.seed(s) sets the key to (s >> 32, s & 0xffffffff)."""
    import mlx.core as mx

    hi, lo = key
    mx.random.seed((hi << 32) | lo)
    if mx_random_key() != list(key):
        raise PipelineError(f"could not restore MLX's random key {key} (got {mx_random_key()}).")


# --- save / load -----------------------------------------------------------------------------


def save_checkpoint(root: Path, step: int, model, optimizer, state: dict, adapter_config: Path,
                    cfg, started: float, inputs: dict) -> Path:
    """Write checkpoint `step` under a temporary name, manifest last, then rename it into place."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    final = root / checkpoint_name(step)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        mx.save_safetensors(str(tmp / WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
        shutil.copy2(adapter_config, tmp / adapter_config.name)
        write_json(tmp / STATE, {"step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **state})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _hash_small(p)} for p in sorted(tmp.iterdir())}
        write_manifest(tmp, "04_train_lora checkpoint", cfg, started, inputs=inputs,
                       outputs={"step": step, "files": files})
    return final


def verify_files(ckpt: Checkpoint) -> None:
    """Check the files against the sizes and hashes in the checkpoint's manifest."""
    manifest = json.loads((ckpt.path / MANIFEST).read_text())
    for name, meta in manifest["outputs"]["files"].items():
        p = ckpt.path / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or _hash_small(p) != meta["sha256"]:
            raise PipelineError(f"checkpoint {ckpt.path} is damaged: {name} differs from its manifest. "
                                f"Delete {ckpt.path} to resume from the one before.")


def load_weights_and_optimizer(ckpt: Checkpoint, model, optimizer) -> None:
    """Load the trainable weights into `model` and the optimizer state into `optimizer`, in place.

    `optimizer` must be initialised (optimizer.init) so its state tree exists; every leaf is
    replaced, keeping the tree's objects (the compiled step holds references to them).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = mx.load(str(ckpt.path / WEIGHTS))
    expected = dict(tree_flatten(model.trainable_parameters()))
    _check_same(weights, expected, ckpt, "adapter weights")
    model.load_weights(list(weights.items()), strict=False)

    saved = mx.load(str(ckpt.path / OPTIMIZER))
    current = dict(tree_flatten(optimizer.state))
    _check_same(saved, current, ckpt, "optimizer state")
    for key, value in saved.items():
        _assign(optimizer.state, key, value)
    mx.eval(model.parameters(), optimizer.state)


def _hash_small(p: Path) -> str | None:
    """sha256 of files up to 1 GB (LoRA checkpoints); a full fine-tune's weights are checked by size."""
    return sha256_file(p) if p.stat().st_size <= 1 << 30 else None


def _check_same(saved: dict, expected: dict, ckpt: Checkpoint, what: str) -> None:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or extra or shapes:
        detail = "; ".join(x for x in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
            f"other shape {', '.join(shapes[:3])}" if shapes else "") if x)
        raise PipelineError(f"checkpoint {ckpt.path.name}: the {what} do not fit this model ({detail}). "
                            "The LoRA settings changed; start without --resume.")


def _assign(tree, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value

