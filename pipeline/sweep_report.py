"""A sweep's comparison: results.md / results.json, a plot, report.html, and its storage accounting.

Storage is measured, not estimated: every file of every trial folder by `os.lstat` (fsio.disk_usage),
against what one full-precision fused model per trial would take, measured where a trial was merged
(--merge) and otherwise computed from the base's parameter count and the fused dtype (and saying so).
"""

from __future__ import annotations

from pathlib import Path

from . import html_page as H
from .fsio import disk_usage, human_size, safetensors_numel, write_bytes, write_json, write_text
from .plots import trial_bars

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def storage(folder: Path, trials: list[dict], base: Path, quantized: Path, fuse_dtype: str) -> dict:
    """Bytes of the sweep's trial folders vs one full checkpoint per trial; `trials`: the trial manifests."""
    trial_bytes = {t["id"]: disk_usage(folder / t["id"])["total_bytes"] for t in trials}
    adapter_bytes = sum(t["adapter_bytes"] for t in trials)
    checkpoint_bytes = sum(t["checkpoint_bytes"] for t in trials)
    merged = [t for t in trials if t.get("merge")]
    if merged:
        full = max(t["merge"]["temp_bytes"] for t in merged)
        how = f"measured: the fused model --merge wrote for trial {merged[0]['id']} ({merged[0]['merge']['dtype']})"
    else:
        params = safetensors_numel(base)
        full = params * DTYPE_BYTES[fuse_dtype]
        how = f"computed: {params:,} parameters x {DTYPE_BYTES[fuse_dtype]} bytes ({fuse_dtype}), weights only"
    total = sum(trial_bytes.values())
    full_total = full * len(trials)
    return {
        "trials": len(trials),
        "sweep_bytes": total,
        "trial_bytes": trial_bytes,
        "adapter_bytes": adapter_bytes,
        "checkpoint_bytes": checkpoint_bytes,
        "full_checkpoint_bytes": full,
        "full_checkpoint_source": how,
        "full_checkpoints_bytes": full_total,
        "ratio": round(full_total / total, 1) if total else None,
        "ratio_adapters_only": round(full_total / adapter_bytes, 1) if adapter_bytes else None,
        # Read in place by every trial, never copied into the sweep folder.
        "shared": {"base": {"path": str(base), "bytes": disk_usage(base)["total_bytes"]},
                   "base_quantized": {"path": str(quantized), "bytes": disk_usage(quantized)["total_bytes"]}},
    }


def storage_lines(s: dict) -> list[str]:
    """The storage figures in words, the users' "200x less storage" claim checked on them."""
    n = s["trials"]
    lines = [
        f"sweep on disk: {human_size(s['sweep_bytes'])} for {n} trial(s) (every file of the trial folders; of it "
        f"adapters {human_size(s['adapter_bytes'])}, "
        + (f"resumable checkpoints with optimizer state {human_size(s['checkpoint_bytes'])}" if s["checkpoint_bytes"]
           else "no resumable checkpoints: removed once scored, --keep-checkpoints keeps them")
        + "); base and quantized base shared, not copied "
        f"({human_size(s['shared']['base']['bytes'])} + {human_size(s['shared']['base_quantized']['bytes'])}).",
        f"full checkpoints: {n} x {human_size(s['full_checkpoint_bytes'])} = {human_size(s['full_checkpoints_bytes'])} "
        f"({s['full_checkpoint_source']}).",
    ]
    if s["ratio"] is not None:
        verdict = "holds" if s["ratio"] >= 200 else "does not hold"
        lines.append(
            f"ratio: {s['ratio']:g}x less storage as stored, {s['ratio_adapters_only']:g}x for the adapter files "
            f"alone: the \"200x less storage\" claim {verdict} for this model and these trials as stored"
            + ("" if s["ratio_adapters_only"] is None or s["ratio_adapters_only"] < 200 or s["ratio"] >= 200
               else " (it does for the adapters alone, without the checkpoints)") + ".")
    return lines


def rows(trials: list[dict], primary: str | None) -> tuple[list[str], list[list]]:
    header = ["#", "trial", "settings", "eval", "test loss", "perplexity", f"{primary} %" if primary else "metric",
              "best val loss", "adapter", "trial folder", "seconds"]
    out = []
    for t in trials:
        r = t["result"]
        metric = r.get("metric", {}).get(primary) if primary else None
        out.append([t["index"], t["id"], t["label"], t["mode"], r["test_loss"], r["perplexity"], metric,
                    (t.get("best") or {}).get("val_loss"), human_size(t["adapter_bytes"]),
                    human_size(t["trial_bytes"]), round(t["seconds"], 1)])
    return header, out


def markdown(header: list, table: list[list]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table]
    return "\n".join(lines)


def write_results(folder: Path, summary: dict) -> dict:
    """results.json, results.md, results.png and report.html in the sweep folder; returns their paths."""
    trials, primary = summary["trials"], summary["primary_metric"]
    header, table = rows(trials, primary)
    text = markdown(header, table)
    words = storage_lines(summary["storage"])
    png = trial_bars(trials, primary)
    write_json(folder / "results.json", summary)
    write_text(folder / "results.md", f"# Sweep {summary['sweep']} (run {summary['run']})\n\n{text}\n\n"
               + "\n".join(f"- {w}" for w in words) + "\n\n![per trial](results.png)\n")
    write_bytes(folder / "results.png", png)
    s = summary["storage"]
    storage_table = H.table(["what", "bytes", "size"], [
        ["sweep (all trial folders)", s["sweep_bytes"], human_size(s["sweep_bytes"])],
        ["  of it adapters", s["adapter_bytes"], human_size(s["adapter_bytes"])],
        ["  of it checkpoints (with optimizer state)", s["checkpoint_bytes"], human_size(s["checkpoint_bytes"])],
        ["one full checkpoint", s["full_checkpoint_bytes"], human_size(s["full_checkpoint_bytes"])],
        [f"{s['trials']} full checkpoints", s["full_checkpoints_bytes"], human_size(s["full_checkpoints_bytes"])],
    ])
    settings = [[t["index"], t["id"], ", ".join(f"{k} = {v}" for k, v in t["settings"].items()) or "-"]
                for t in trials]
    page = H.page(f"Sweep {summary['sweep']} (run {summary['run']})", [
        ("Results", [H.table(header, table),
                     f"eval: {summary['mode_text']}; best: trial {summary['best']}" if summary.get("best")
                     else f"eval: {summary['mode_text']}"]),
        ("Per trial", [H.figure_png(png, "test loss and task metric per trial")]),
        ("Storage", [storage_table, *words]),
        ("Trial settings", [H.table(["#", "trial", "settings over the run's config"], settings)]),
    ])
    H.write_page(folder / "report.html", page)
    return {k: str(folder / f) for k, f in [("json", "results.json"), ("markdown", "results.md"),
                                           ("plot", "results.png"), ("html", "report.html")]}
