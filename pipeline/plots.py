"""Every figure the pipeline draws (04's loss.png, the run report, the sweep report): matplotlib
drawn to PNG bytes in memory, so pages can embed them and files are written atomically by the caller;
no display is needed."""

from __future__ import annotations

import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: a Linux server or CI has no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def loss_curves(log: list[dict], best_step: int | None = None) -> bytes | None:
    """Train and validation loss per step (adapters/train_log.jsonl rows); None when it has neither."""
    train = [(r["step"], r["train_loss"]) for r in log if isinstance(r.get("train_loss"), (int, float))]
    valid = [(r["step"], r["val_loss"]) for r in log if isinstance(r.get("val_loss"), (int, float))]
    if not train and not valid:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", label=f"best adapter (step {best_step})")
    losses = [y for _, y in train + valid]
    if min(losses) > 0 and max(losses) / min(losses) > 100:  # a loss that falls to ~0.01 is flat on a linear axis
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def size_vs_quality(points: list[dict], metric_name: str | None, reference: float | None = None) -> bytes | None:
    """One point per verified export: size (MB) against KL to the MLX model and, when the task has a
    metric, against that metric (`reference`: the MLX model's, drawn as a line).
    `points`: {"label", "size_mb", "kl", "metric"}."""
    with_kl = [p for p in points if isinstance(p.get("kl"), (int, float))]
    with_metric = [p for p in points if isinstance(p.get("metric"), (int, float))] if metric_name else []
    if not with_kl and not with_metric:
        return None
    plt = _pyplot()
    panels = [p for p in ("kl", "metric") if (with_kl if p == "kl" else with_metric)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = with_kl if panel == "kl" else with_metric
        # KL spans several decades (F16 ~1e-5, Q4 ~0.1): a log axis keeps every point readable.
        ys = [max(p["kl"], 1e-7) if panel == "kl" else p["metric"] for p in rows]
        ax.scatter([p["size_mb"] for p in rows], ys, color="tab:blue", zorder=3)
        # Exports of one size or one score sit on top of each other: alternate their labels above and below.
        order = sorted(range(len(rows)), key=lambda i: (ys[i], rows[i]["size_mb"]))
        for n, i in enumerate(order):
            ax.annotate(rows[i]["label"], (rows[i]["size_mb"], ys[i]), textcoords="offset points",
                        xytext=(5, 5 if n % 2 == 0 else -12), fontsize=8)
        if panel == "kl":
            ax.set_yscale("log")
            ax.set_ylabel("KL to the MLX model (lower is better)")
        else:
            if reference is not None:
                ax.axhline(reference, color="tab:green", linestyle="--", label=f"MLX model {reference:.1f} %")
                ax.legend(loc="lower right")
            ax.set_ylabel(f"{metric_name} % (higher is better)")
        ax.set_xlabel("file size (MB)")
        ax.grid(alpha=0.3)
    return _png(fig)


def trial_bars(trials: list[dict], primary: str | None) -> bytes:
    """Test loss (and the task metric) per trial, as PNG bytes."""
    plt = _pyplot()
    names = [f"{t['index']}: {t['label']}" for t in trials]
    panels = [("test loss", [t["result"]["test_loss"] for t in trials])]
    if primary:
        panels.append((f"{primary} %", [t["result"].get("metric", {}).get(primary) or 0.0 for t in trials]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 1.2 + 0.45 * len(trials)), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        ax.barh(range(len(values)), values, color="#4878a8")
        ax.set_yticks(range(len(values)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        if title.endswith("%"):
            ax.set_xlim(0, 105)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    return _png(fig)
