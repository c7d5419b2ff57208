"""Run ours and the anchor on the same input, interleaved, and record medians and ratios.

Each measured run is a fresh process; its wall time, CPU time (user + system) and peak RSS come
from `os.wait4` (of that process and the children it waited for). On a shared, loaded machine the
CPU seconds are the steadier figure: the wall time also measures the others. Runs alternate
ours, anchor, ours, anchor... so a noisy shared machine slows both sides alike.
Results merge into bench/results/<machine>.json; `python -m bench.report` renders the table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"  # inputs and outputs of benchmarks (git-ignored)


@dataclass
class Cmd:
    """One command to measure. `before` runs (unmeasured) ahead of every run, e.g. to delete outputs."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    before: Callable[[], None] | None = None
    label: str = ""
    # Read a figure from the finished run (e.g. tokens/s from a log): name -> value.
    figures: Callable[[str], dict[str, float]] | None = None


@dataclass
class Run:
    wall_s: float
    peak_rss_gb: float
    figures: dict[str, float]
    cpu_s: float = 0.0


def machine_name() -> str:
    """A stable name for this kind of machine: os-arch-Ncpu[-gpu]."""
    name = f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu"
    gpu = gpu_name()
    return f"{name}-{gpu.replace(' ', '_')}" if gpu else name


def gpu_name() -> str:
    from pipeline.runtime import visible_nvidia_gpus

    gpus = visible_nvidia_gpus()
    return gpus[0] if gpus else ""


def describe_machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"system": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb,
            "gpu": gpu_name() or None, "python": platform.python_version(),
            "load_average_at_start": load}


# A forked child's peak RSS starts at its parent's size before exec, so the measured command is
# forked from this small fresh interpreter instead of from the (large) benchmark process.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def measure(cmd: Cmd, log: Path | None = None) -> Run:
    """Run `cmd` once in a fresh process; raise with its output tail if it fails."""
    if cmd.before:
        cmd.before()
    env = dict(os.environ, **cmd.env)
    log = log or WORK / "last.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".maxrss")
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd.argv], env=env,
                              cwd=cmd.cwd, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd.argv)} exited {proc.returncode}:\n{text[-3000:]}")
    # ru_maxrss (of the command and the children it waited for) is in KiB on Linux, bytes on macOS.
    maxrss, cpu = rss_file.read_text().split()
    rss = int(maxrss) * (1 if sys.platform == "darwin" else 1024)
    return Run(wall, rss / 1e9, cmd.figures(text) if cmd.figures else {}, float(cpu))


def _summary(runs: list[Run]) -> dict:
    keys = sorted({k for r in runs for k in r.figures})
    return {
        "wall_s": round(statistics.median(r.wall_s for r in runs), 2),
        "cpu_s": round(statistics.median(r.cpu_s for r in runs), 2),
        "peak_rss_gb": round(max(r.peak_rss_gb for r in runs), 3),
        "runs_wall_s": [round(r.wall_s, 2) for r in runs],
        **{k: round(statistics.median(r.figures[k] for r in runs if k in r.figures), 4) for k in keys},
    }


def compare(name: str, ours: Cmd, anchor: Cmd | None, repeats: int = 2, what: str = "",
            extra: dict | None = None) -> dict:
    """Measure ours and the anchor `repeats` times each, interleaved; record and print the ratios.

    A ratio is ours / anchor: below 1.0 means ours is faster or smaller.
    """
    ours_runs, anchor_runs = [], []
    for i in range(repeats):
        print(f"[{name}] run {i + 1}/{repeats}: ours ({ours.label or ours.argv[0]})", flush=True)
        ours_runs.append(measure(ours, WORK / f"{name}-ours.log"))
        if anchor:
            print(f"[{name}] run {i + 1}/{repeats}: anchor ({anchor.label or anchor.argv[0]})", flush=True)
            anchor_runs.append(measure(anchor, WORK / f"{name}-anchor.log"))
    row = {"what": what, "ours": {"label": ours.label, **_summary(ours_runs)}, "repeats": repeats,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    if anchor:
        row["anchor"] = {"label": anchor.label, **_summary(anchor_runs)}
        row["ratio"] = {k: round(row["ours"][k] / row["anchor"][k], 3)
                        for k in row["ours"] if k in row["anchor"] and isinstance(row["ours"][k], float)
                        and row["anchor"][k]}
    record(name, row)
    print(f"[{name}] {json.dumps({k: row[k] for k in ('ours', 'anchor', 'ratio') if k in row})}", flush=True)
    return row


def record(name: str, row: dict, machine: str | None = None) -> Path:
    """Merge one benchmark's row into bench/results/<machine>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{machine or machine_name()}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("machine", describe_machine())
    data.setdefault("benchmarks", {})[name] = row
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def python() -> str:
    """The interpreter running the benchmark (the project's venv)."""
    return sys.executable


def venv_bin(tool: str) -> str:
    return str(Path(sys.executable).parent / tool)
