"""Backend facts: which device MLX runs on, which dtype to compute in, and a fast BLAS on Linux."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

# Debian's OpenBLAS: the mlx-cpu wheel bundles the reference BLAS (~7 GFLOP/s vs ~215).
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")


def mlx_backend_missing(package_dirs: list[str] | None = None) -> bool:
    """True on Linux when MLX is installed without a backend: plain `pip install mlx-pipeline` brings
    the `mlx` bindings, and libmlx.so comes from the `cpu` or `cuda` extra (mlx-cpu / mlx-cuda-*)."""
    if package_dirs is None:
        if sys.platform != "linux" or (spec := importlib.util.find_spec("mlx")) is None:
            return False
        package_dirs = list(spec.submodule_search_locations or [])
    return not any((Path(d) / "lib" / "libmlx.so").exists() for d in package_dirs)


NO_BACKEND = ("error: MLX is installed without a backend (mlx-pipeline's Linux extras choose one). Run "
              "`make setup` (it picks CUDA when nvidia-smi sees a GPU), or pip install 'mlx-pipeline[cpu]', "
              "or 'mlx-pipeline[cuda]' on a machine with an NVIDIA GPU.")


def ensure_fast_blas(argv: list[str] | None = None) -> None:
    """Re-exec the current command with OpenBLAS preloaded when MLX would use the slow BLAS.

    LD_PRELOAD only works at process start, so this must run before mlx is imported.
    Set MLX_PIPELINE_NO_REEXEC=1 to opt out. Also the first check of every command: it stops
    with the fix when MLX has no backend (mlx_backend_missing), before an ImportError would.
    """
    if mlx_backend_missing():
        sys.exit(NO_BACKEND)
    if (
        sys.platform != "linux"
        or not OPENBLAS.exists()
        or "libopenblas" in os.environ.get("LD_PRELOAD", "")
        or os.environ.get("MLX_PIPELINE_NO_REEXEC")
        or "mlx.core" in sys.modules
    ):
        return
    env = dict(os.environ, MLX_PIPELINE_NO_REEXEC="1")
    env["LD_PRELOAD"] = ":".join(p for p in (str(OPENBLAS), os.environ.get("LD_PRELOAD", "")) if p)
    # The interpreter's own arguments, so `python -m pipeline.cli` re-runs as a module
    # (sys.argv would relaunch cli.py as a plain script, breaking its relative imports).
    argv = argv if argv is not None else sys.orig_argv[1:]
    os.execve(sys.executable, [sys.executable, *argv], env)


# What a user on a machine with an NVIDIA GPU runs to get MLX's CUDA backend.
CUDA_FIX = "make setup BACKEND=cuda (or: pip uninstall mlx-cpu; pip install 'mlx-pipeline[cuda]')"


@cache
def visible_nvidia_gpus() -> tuple[str, ...]:
    """Names of the NVIDIA GPUs that `nvidia-smi -L` lists; empty without nvidia-smi or a working driver."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(m.group(1).strip() for m in re.finditer(r"^GPU \d+: ([^(\n]+)", out.stdout, re.M))


def device_banner(dtype_choice: str = "auto") -> tuple[str, str | None]:
    """The banner line naming MLX's device and the compute dtype, and a warning when an NVIDIA GPU
    is visible but MLX runs on the CPU (the mlx[cpu] wheel installed where mlx[cuda] belongs)."""
    import mlx.core as mx

    backend = backend_name()
    dtype = str(compute_dtype(dtype_choice)).replace("mlx.core.", "")
    name = mx.device_info(mx.default_device()).get("device_name") or ""
    if backend == "cuda" and not name:
        name = ", ".join(visible_nvidia_gpus())
    line = f"device: {backend}{f' ({name})' if name else ''} | compute dtype: {dtype}"
    gpus = visible_nvidia_gpus()
    warning = None
    if backend == "cpu" and gpus:
        warning = (f"warning: an NVIDIA GPU is visible ({', '.join(gpus)}) but MLX runs on the CPU "
                   f"(its CPU-only backend is installed): training is many times slower. Fix: {CUDA_FIX}")
    return line, warning


def is_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def backend_name() -> str:
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def compute_dtype(choice: str = "auto"):
    """float32 on the CPU backend (bf16 quantized matmul is inaccurate and slow there), bf16 elsewhere."""
    import mlx.core as mx

    if choice == "auto":
        return mx.float32 if is_cpu() else mx.bfloat16
    return getattr(mx, choice)


def peak_memory_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 1e9


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def _own_cpu_ticks() -> int | None:
    """User + system clock ticks of this process so far (all its threads), /proc/self/stat."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def free_cores(window: float = 0.15) -> int | None:
    """How many of this process's cores other processes leave idle now (over `window` seconds,
    /proc/stat), at least 1; None where it cannot be measured. Call it while this process is idle.
    This process's own threads count as free: BLAS and OpenMP workers spin for a while after their
    last task (after the MLX reference forward they made a 2-core machine look half busy).
    llama.cpp's threads wait for each other at every operation: one thread more than the free cores
    makes a decode several times slower (measured: 30 answers 36 s with 1 thread, > 3 min with 2
    while the tests ran beside; 1.7-1.9x faster with 2 on 2 idle cores)."""
    import time

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    first, own = _cpu_times(), _own_cpu_ticks()
    if first is None:
        return None
    time.sleep(window)
    second, own_after = _cpu_times(), _own_cpu_ticks()
    idle, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    if own is not None and own_after is not None:  # /proc/stat and /proc/self/stat: both USER_HZ ticks
        idle = min(total, idle + own_after - own)
    free = idle / total * (os.cpu_count() or allowed)
    return max(1, min(allowed, int(free + 0.2)))
