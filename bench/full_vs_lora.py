"""Full fine-tuning vs LoRA on the demo task, each through the real CLI.

    python -m bench.full_vs_lora [--iters N] [--only qlora,lora,full]

Three runs of configs/default.yaml (embedded SmolLM2-135M, the bundled sample task), each taken
through `mlx-pipeline data/base/quantize/train/eval` in its own run folder under
bench/work/full_vs_lora/:

- `qlora`: the default: LoRA on the 4-bit base (QLoRA).
- `lora`:  LoRA on the unquantized base (`--no-quantized`), the fair comparison for full FT.
- `full`:  full fine-tuning (`USE_LORA=0 --no-quantized`) of the same `train.num_layers` layers.

Per run: train wall time and seconds per optimizer step (from adapters/train_log.jsonl: tokens of
each report window / its tokens per second, so validation and checkpoint writes are left out),
peak memory (MLX's, manifest result.peak_memory_gb, and the train process's peak RSS from
os.wait4), the adapter file's size vs one checkpoint's (weights + Adam state), test loss and the
task metric from 05 eval (eval/results.json). All runs use the same `--iters` (default: the config's).
Results: bench/results/full_vs_lora.{json,md}. One repeat each: see the noise note in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .harness import RESULTS, ROOT, WORK, Cmd, describe_machine, measure

CONFIG = ROOT / "configs" / "default.yaml"
MODELS = WORK / "full_vs_lora"
RUNS = {
    "qlora": ("LoRA on the 4-bit base (QLoRA, the default)", [], {}),
    "lora": ("LoRA on the float base (--no-quantized)", ["--no-quantized"], {}),
    "full": ("full fine-tuning (USE_LORA=0 --no-quantized)", ["--no-quantized"], {"USE_LORA": "0"}),
}


def _cli(phase: str, run: str, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "mlx-pipeline"), phase, "--config", str(CONFIG), "--run", run,
            "--models-dir", str(MODELS), *extra]


def _prepare(run: str, quantized: bool) -> None:
    """base, data (and quantize for QLoRA): inputs, not measured; kept when already complete."""
    outputs = {"base": "base", "data": "data", "quantize": "base-quantized"}
    for phase in ["base", "data"] + (["quantize"] if quantized else []):
        if not (MODELS / run / outputs[phase] / "manifest.json").exists():
            print(f"[full_vs_lora] {run}: {phase}", flush=True)
            subprocess.run(_cli(phase, run), check=True, stdout=subprocess.DEVNULL)


def step_seconds(log_rows: list[dict]) -> float:
    """Mean seconds per optimizer step, from the report windows (validation not included)."""
    rows = [r for r in log_rows if "tokens_per_second" in r]
    seconds, steps, prev_tokens, prev_step = 0.0, 0, 0, 0
    for r in rows:  # trained_tokens counts the loss tokens: divide by their own rate where logged
        rate = r.get("trained_tokens_per_second", r["tokens_per_second"])
        seconds += (r["trained_tokens"] - prev_tokens) / max(rate, 1e-9)
        steps += r["step"] - prev_step
        prev_tokens, prev_step = r["trained_tokens"], r["step"]
    return seconds / max(steps, 1)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def collect(run_dir: Path, with_eval: bool = True) -> dict:
    """The figures of one finished run folder (train + eval manifests, log, checkpoint)."""
    adapters = run_dir / "adapters"
    manifest = json.loads((adapters / "manifest.json").read_text())
    result = manifest["result"]
    log = [json.loads(line) for line in (adapters / "train_log.jsonl").read_text().splitlines() if line.strip()]
    ckpts = sorted((adapters / "checkpoints").glob("step-*"))
    last = ckpts[-1]
    ev = json.loads((run_dir / "eval" / "manifest.json").read_text()) if with_eval else {}
    res = json.loads((run_dir / "eval" / "results.json").read_text()) if with_eval else {}
    scored = res.get("adapter", {})
    primary = res.get("primary_metric")
    metric = scored.get("metric", {})
    return {
        "parameters": result["parameters"],
        "final_train_loss": result["final_train_loss"],
        "final_val_loss": result["final_val_loss"],
        "seconds_per_step": round(step_seconds(log), 3),
        "tokens_per_second": result["tokens_per_second"],
        "mlx_peak_memory_gb": result["peak_memory_gb"],
        "adapter_bytes": _size(adapters / "adapters.safetensors"),
        "checkpoint": last.name,
        "checkpoint_weights_bytes": _size(last / "adapters.safetensors"),
        "checkpoint_optimizer_bytes": _size(last / "optimizer.safetensors"),
        "checkpoint_bytes": _size(last),
        "test_loss": scored.get("test_loss", scored.get("loss")),
        "metric_name": primary,
        "metric": metric.get(primary) if primary else None,
        "eval_adapter": scored,
        "eval_adapter_choice": ev.get("adapter"),  # which adapter 05 scored (keep_best: best/)
    }


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes (the measured phase and its launcher)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _git() -> dict:
    """The commit measured at, and the files changed on top of it (others edit the checkout meanwhile)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted_pipeline_files": [ln[3:] for ln in git("status", "--porcelain").splitlines()
                                           if ln[3:].startswith("pipeline/")]}


def train_one(name: str, iters: int, reuse: bool) -> dict:
    """Train run `name` (measured) unless `reuse` and a finished train of `iters` steps is recorded."""
    what, flags, env = RUNS[name]
    record = MODELS / f"{name}-train.json"
    if reuse and record.exists() and (MODELS / name / "adapters" / "manifest.json").exists():
        row = json.loads(record.read_text())
        if row["iters"] == iters:
            print(f"[full_vs_lora] {name}: train of {iters} steps already measured ({record})", flush=True)
            return row
    _prepare(name, quantized="--no-quantized" not in flags)
    run_dir = MODELS / name
    for out in ("adapters", "eval"):
        shutil.rmtree(run_dir / out, ignore_errors=True)
    print(f"[full_vs_lora] {name}: train ({what}), {iters} steps", flush=True)
    before = _children_cpu_s()
    train = measure(Cmd(_cli("train", name, "--iters", str(iters), *flags), env=env), MODELS / f"{name}-train.log")
    train_cpu_s = _children_cpu_s() - before
    print(f"[full_vs_lora] {name}: train {train.wall_s:.0f} s, peak RSS {train.peak_rss_gb:.2f} GB", flush=True)
    row = {"what": what, "flags": [f"{k}={v}" for k, v in env.items()] + flags, "iters": iters,
           "train_wall_s": round(train.wall_s, 1), "train_cpu_s": round(train_cpu_s, 1),
           "load_average_after_train": round(os.getloadavg()[0], 2), "train_peak_rss_gb": round(train.peak_rss_gb, 3),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_git()}
    record.write_text(json.dumps(row, indent=2) + "\n")
    return row


def eval_one(name: str, reuse: bool) -> dict:
    """05 eval (base + adapter only) of a trained run; the error when it fails."""
    _, flags, env = RUNS[name]
    record = MODELS / f"{name}-eval.json"
    results = MODELS / name / "eval" / "results.json"
    if reuse and results.exists() and results.stat().st_mtime > (MODELS / name / "adapters").stat().st_mtime:
        return json.loads(record.read_text()) if record.exists() else {}
    print(f"[full_vs_lora] {name}: eval", flush=True)
    try:
        ev = measure(Cmd(_cli("eval", name, "--skip-base", *flags), env=env), MODELS / f"{name}-eval.log")
    except RuntimeError as e:
        print(f"[full_vs_lora] {name}: eval failed: {str(e)[-400:]}", flush=True)
        return {"eval_error": str(e).strip().splitlines()[-1]}
    row = {"eval_wall_s": round(ev.wall_s, 1)}
    record.write_text(json.dumps(row) + "\n")
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _pct(x) -> str:
    return "" if x is None else f"{x:.1f} %"


def markdown(data: dict) -> str:
    runs = data["runs"]
    commits = ", ".join(sorted({f"`{r['commit'][:12]}`" for r in runs if r.get("commit")}))
    dirty = ", ".join(sorted({f for r in runs for f in r.get("uncommitted_pipeline_files", [])})) or "none"
    lines = [
        "# Full fine-tuning vs LoRA on the demo task",
        "",
        f"`{data['command']}`; trained at commit(s) {commits} (uncommitted pipeline files then: {dirty}), "
        f"{min(r.get('measured_at', data['measured_at']) for r in runs)}; "
        f"{data['machine']['cores']}-core {data['machine']['system']} ({data['machine']['cpu']}), MLX CPU backend, "
        f"float32. configs/default.yaml (SmolLM2-135M, rank {data['rank']}, alpha {data['alpha']}, "
        f"num_layers {data['num_layers']}, batch {data['batch_size']}) with **{data['iters']} steps** for every run "
        f"(the config says {data['config_iters']}). One run each, on a 2-core machine that other jobs shared "
        f"(load average {', '.join(str(r['load_average_after_train']) for r in runs)} after each train): "
        "wall times and s / step are noisy; the CPU time of the train process is the steadier figure.",
        "",
        "| run | trainable params | s / step | train wall (CPU time) | MLX peak | process peak RSS | adapter file "
        "| checkpoint (weights + Adam) | final val loss | test loss | " + (runs[0].get("metric_name") or "metric")
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in zip(data["order"], runs):
        p = r["parameters"]
        lines.append(
            f"| {name}: {r['what']} | {p['trainable']:,} ({p['trainable_percent']:.2f} %) "
            f"| {r['seconds_per_step']:.2f} "
            f"| {r['train_wall_s']:.0f} s ({r['train_cpu_s']:.0f} CPU-s) "
            f"| {r['mlx_peak_memory_gb']:.2f} GB | {r['train_peak_rss_gb']:.2f} GB "
            f"| {_mb(r['adapter_bytes'])} | {_mb(r['checkpoint_bytes'])} ({_mb(r['checkpoint_weights_bytes'])} + "
            f"{_mb(r['checkpoint_optimizer_bytes'])}) | {r['final_val_loss']} | "
            f"{r['test_loss'] if r['test_loss'] is None else round(r['test_loss'], 4)} | "
            f"{_pct(r['metric'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None, help="optimizer steps of every run (default: the config's)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a run's measured train of the same --iters and its eval (only redo what is missing)")
    ap.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(CONFIG.read_text())
    args.iters = args.iters or cfg["train"]["iters"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    order = [n for n in args.only.split(",") if n]
    t0 = time.time()
    trained = [train_one(n, args.iters, args.reuse) for n in order]  # all trains first, then the evals
    rows = []
    for name, row in zip(order, trained):
        row = dict(row, **eval_one(name, args.reuse))
        rows.append(dict(row, **collect(MODELS / name, "eval_error" not in row)))
    data = {
        "command": f"python -m bench.full_vs_lora --iters {args.iters}",
        "commit": commit,
        "dirty_files": subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                      capture_output=True, text=True).stdout.split("\n")[:-1],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": describe_machine(),
        "iters": args.iters, "config_iters": cfg["train"]["iters"], "rank": cfg["train"]["rank"],
        "alpha": cfg["train"]["alpha"], "num_layers": cfg["train"]["num_layers"],
        "batch_size": cfg["train"]["batch_size"], "order": order, "runs": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "full_vs_lora.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "full_vs_lora.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
