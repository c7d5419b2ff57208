"""Data-parallel training: 04 runs itself under MLX's own launcher, `mlx.launch`.

`train.nproc: N` starts N ranks on this machine; `train.hosts: hosts.json` (mlx.launch's
hostfile) spreads them over machines. Backend: ring (TCP, the default), mpi, or nccl (CUDA).
Every rank runs `mlx-pipeline train` on the resolved config, with MLX_RANK set by mlx.launch;
pipeline/trainer.py splits each batch over the ranks and sums their gradients, rank 0 writes.

mlx.launch exits 0 even when a rank failed, so success is read from what rank 0 wrote: a
04 manifest newer than the launch. Ctrl-C / SIGTERM are passed to every rank (they agree on
a step, save a checkpoint and stop).
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

import click
import yaml

from . import checkpoints as ckpt
from .errors import MissingInputError, PipelineError
from .fsio import write_text
from .manifest import MANIFEST
from .paths import RunPaths
from .runtime import backend_name


def launcher() -> str:
    """The mlx.launch script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    if not found:
        raise MissingInputError("mlx.launch not found (it comes with the mlx package). Reinstall with `make setup`.")
    return found


def backend(cfg) -> str:
    chosen = cfg.train.distributed_backend
    if chosen == "auto":
        return "nccl" if backend_name() == "cuda" else "ring"
    return chosen


def launch_command(cfg, config_file: Path, resume: bool, force_resume: bool) -> list[str]:
    t = cfg.train
    cmd = [launcher(), "--backend", backend(cfg)]
    if t.hosts:
        if not Path(t.hosts).is_file():
            raise MissingInputError(f"train.hosts {t.hosts}: no such file. Write an mlx.launch hostfile "
                                    "(see `mlx.distributed_config --help`) or use train.nproc for local ranks.")
        cmd += ["--hostfile", str(t.hosts)]
    else:
        cmd += ["-n", str(t.nproc)]
    cmd += ["--", sys.executable, "-m", "pipeline.cli", "train", "--config", str(config_file)]
    return cmd + (["--resume"] if resume else []) + (["--force-resume"] if force_resume else [])


def launch_training(cfg, resume: bool, force_resume: bool) -> dict:
    """Run 04 on every rank; the TrainResult fields of rank 0's manifest, or an error naming the
    newest checkpoint to resume from."""
    from .trainer import TrainingInterrupted

    t = cfg.train
    if not t.hosts and t.batch_size % t.nproc:
        raise PipelineError(f"train.batch_size {t.batch_size} does not split over train.nproc {t.nproc} ranks: "
                            f"use a multiple of {t.nproc} (each rank takes batch_size / nproc rows).")
    paths = RunPaths(cfg)
    config_file = paths.root / ".train-ranks.yaml"
    cmd = launch_command(cfg, config_file, resume, force_resume)  # checks train.hosts first
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ranks = f"hosts of {cfg.train.hosts}" if cfg.train.hosts else f"{cfg.train.nproc} local ranks"
    click.echo(f"data-parallel training: {ranks}, mlx.launch backend {backend(cfg)}\n  {' '.join(cmd)}")
    started = time.time()
    # The ranks get their own session so that a signal reaches them through us, once.
    proc = subprocess.Popen(cmd, start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    manifest = paths.adapters / MANIFEST
    if manifest.is_file() and manifest.stat().st_mtime >= started:
        result = json.loads(manifest.read_text())["result"]
        return dict(result, adapter_dir=paths.adapters)
    newest = ckpt.complete_checkpoints(paths.root / ".adapters.partial" / ckpt.CHECKPOINTS)
    where = (f"the newest checkpoint is step {newest[-1].step} ({newest[-1].path})" if newest
             else "no checkpoint was saved yet")
    if received:
        raise TrainingInterrupted(f"interrupted; {where}. Resume with `mlx-pipeline train --resume` "
                                  "(the same or another number of ranks)", newest[-1].step if newest else 0,
                                  newest[-1].path if newest else paths.root, 128 + received[0])
    raise PipelineError(f"data-parallel training stopped before the end: a rank failed or was killed (its "
                        f"messages are above); {where}. Fix the cause, then resume with "
                        "`mlx-pipeline train --resume` (`make train RESUME=1`).")
