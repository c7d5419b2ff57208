"""`mlx-pipeline report`: one self-contained HTML page per run, models/<run>/report.html.

Reads only what the phases left behind (manifests, adapters/train_log.jsonl, eval/results.json,
verify/report.json), never runs a phase: a phase that has not run shows as "not run yet: `make
<target>`", and a manifest this version cannot read shows its error in its own section, so one old
or broken file never costs the whole page. Figures are drawn in memory (pipeline/plots.py)
and embedded, so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from . import html_page as H
from .errors import MissingInputError, PipelineError
from .export_choice import choose_export, files_of, type_key
from .manifest import MANIFEST
from .paths import RunPaths

REPORT = "report.html"
SAMPLE_CHARS = 300  # a base model's rambling answer is cut here; the table stays readable


class NotRun(Exception):
    """A phase's output is missing: its section says which `make` target makes it."""

    def __init__(self, target: str, what: str = ""):
        super().__init__(target)
        self.target, self.what = target, what


def write_report(cfg, output: str | Path | None = None) -> Path:
    """Write the run's report (default models/<run>/report.html, atomically) and return its path."""
    paths = RunPaths(cfg)
    if not paths.root.is_dir():
        raise MissingInputError(
            f"No run folder at {paths.root}: nothing to report on. Run the pipeline first (`make demo`, or `make "
            f"train` ...), or name an existing run with --run / RUN= and --models-dir / MODELS_DIR=.")
    from tqdm import tqdm

    sections = []
    steps = list(SECTIONS.items())
    with tqdm(steps, desc="report", unit="section", leave=False) as bar:
        for heading, build in bar:
            bar.set_postfix_str(heading)
            sections.append((heading, _section(build, paths)))
    title = f"Run '{cfg.run}': fine-tune report"
    out = H.write_page(Path(output) if output else paths.root / REPORT, H.page(title, sections))
    click.secho(f"report: {out}", fg="green")
    return out


def _section(build, paths: RunPaths) -> list:
    try:
        return build(paths)
    except NotRun as e:
        return [H.paragraph(f"{e.what + ' ' if e.what else ''}not run yet: `make {e.target}`", "note")]
    except (PipelineError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # A manifest from another version, or a file edited by hand: say so here, keep the rest.
        return [H.paragraph(f"could not read this phase's output: {type(e).__name__}: {e}", "bad")]


def _manifest(folder: Path, target: str) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise NotRun(target)
    return json.loads(path.read_text())


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def _num(v, digits: int = 4):
    """Numbers as they are (the table formats floats); None as an empty cell."""
    return "" if v is None else round(v, digits) if isinstance(v, float) else v


# --------------------------------------------------------------------------------------------
# Sections, in page order


def overview(paths: RunPaths) -> list:
    done = sorted(p.parent.name for p in paths.root.glob(f"*/{MANIFEST}"))
    return [
        H.table(["run folder", "written", "phase outputs present"],
                [[str(paths.root), time.strftime("%Y-%m-%d %H:%M:%S %Z"), ", ".join(done) or "none"]]),
        *[H.paragraph(line) for line in _headline(paths)],
        H.paragraph("Every number on this page is read from the files the phases wrote (manifest.json, "
                    "train_log.jsonl, eval/results.json, verify/report.json); `make report` rewrites it.", "note"),
    ]


def _headline(paths: RunPaths) -> list[str]:
    """The two answers people open the page for, when the files are there: did the adapter learn
    the task (05), and did every export keep it (10). Details in their sections."""
    lines = []
    results = _read_json(paths.eval / "results.json")
    if isinstance(results, dict) and results.get("primary_metric"):
        m = results["primary_metric"]
        base, tuned = ((results.get(k) or {}).get("metric", {}).get(m) for k in ("base", "adapter"))
        if tuned is not None:
            lines.append(f"task metric {m}: base {_fmt(base)} %, base + adapter {_fmt(tuned)} % "
                         f"({results.get('scored_rows', '?')} test rows, 05 eval)")
    report = _read_json(paths.verify / "report.json")
    if isinstance(report, dict):
        n = sum(not r["file"].endswith("(MLX)") for r in report.get("models", []))
        lines.append(f"{n} exports measured in llama.cpp (10 verify): "
                     + ("all passed" if report.get("passed") else f"{len(report.get('failures', []))} failure(s)"))
    return lines


def configuration(paths: RunPaths) -> list:
    """The config each phase recorded (what actually ran). A key whose value differs between phases
    (the YAML was edited between them) lists each phase's value."""
    recorded = []
    for m in _manifests(paths.root):
        if isinstance(m.get("config"), dict):
            recorded.append((m.get("phase", "?"), _flatten(m["config"])))
    if not recorded:
        config, source = _flatten(paths.cfg.to_dict()), "(no phase has run: the config as loaded now)"
        return [H.paragraph(source, "note"), H.table(["key", "value"], [[k, repr(v)] for k, v in config.items()])]
    rows = []
    for key in dict.fromkeys(k for _, flat in recorded for k in flat):
        values = {phase: flat[key] for phase, flat in recorded if key in flat}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) == 1:
            rows.append([key, repr(next(iter(values.values())))])
        else:  # grouped by value: "True (01, 02, 04); False (07)"
            by_value: dict[str, list[str]] = {}
            for phase, v in values.items():
                by_value.setdefault(repr(v), []).append(phase.split("_", 1)[0])
            rows.append([key, "; ".join(f"{v} ({', '.join(ps)})" for v, ps in by_value.items())])
    return [H.paragraph(f"As recorded by {len(recorded)} phase manifests; where they differ, each phase's value.",
                        "note"), H.table(["key", "value"], rows)]


def data(paths: RunPaths) -> list:
    m = _manifest(paths.data, "data")
    stats = m.get("stats") or {}
    rows = [[split, s.get("rows"), s.get("tokens"), s.get("mean"), s.get("p95"), s.get("max")]
            for split, s in stats.items()]
    parts = [H.paragraph(f"format: {m.get('format', '?')}; source rows: {(m.get('inputs') or {}).get('rows', '?')}"),
             H.table(["split", "rows", "tokens", "mean tokens/row", "p95", "max"], rows)]
    removed = [[why, split, n] for why, by_split in (m.get("removed") or {}).items()
               for split, n in (by_split or {}).items()]
    parts.append(H.table(["removed because", "split", "rows"], removed) if removed
                 else H.paragraph("no rows removed (duplicates, test rows also in train, overlong)", "note"))
    return parts


def training(paths: RunPaths) -> list:
    m = _manifest(paths.adapters, "train")
    result = m.get("result") or {}
    params = result.get("parameters") or {}
    best = _read_json(paths.adapters / "best" / "best.json") or {}
    rows = [["fine-tune type", (m.get("config") or {}).get("train", {}).get("fine_tune_type", "")],
            ["backend", m.get("backend", "")],
            ["first / final validation loss", f"{_fmt(result.get('first_val_loss'))} / "
                                              f"{_fmt(result.get('final_val_loss'))}"],
            ["final train loss", _fmt(result.get("final_train_loss"))],
            ["best adapter (adapters/best/)", f"step {best['step']}, validation loss {_fmt(best.get('val_loss'))}"
             if "step" in best else "none kept"],
            ["trainable parameters", f"{params.get('trainable', 0):,} of {params.get('total', 0):,} "
                                     f"({params.get('trainable_percent', 0):.3f} %)" if params else ""],
            ["tokens per second", _fmt(result.get("tokens_per_second"))],
            ["peak memory", f"{result['peak_memory_gb']} GB" if "peak_memory_gb" in result else ""],
            ["resumed from step", str(m.get("resumed_from_step", ""))]]
    parts = [H.table(["", "value"], rows)]
    log = _read_jsonl(paths.adapters / "train_log.jsonl")
    from .plots import loss_curves

    png = loss_curves(log, best.get("step"))
    parts.append(H.figure_png(png, "loss curves: train and validation loss per step") if png
                 else H.paragraph("adapters/train_log.jsonl holds no loss values", "note"))
    return parts


def evaluation(paths: RunPaths) -> list:
    _manifest(paths.eval, "eval")
    r = json.loads((paths.eval / "results.json").read_text())
    primary = r.get("primary_metric")
    models = [(name, r[key]) for name, key in (("base", "base"), ("base + adapter", "adapter")) if r.get(key)]
    metric_names = [k for _, m in models for k in (m.get("metric") or {})
                    if k not in ("n", "primary") and not k.endswith("_count")]
    metric_names = list(dict.fromkeys(metric_names))
    rows = [[name, _num(m.get("test_loss")), _num(m.get("perplexity"))]
            + [_num((m.get("metric") or {}).get(k)) for k in metric_names] for name, m in models]
    parts = [H.paragraph(f"{r.get('scored_rows', '?')} of {r.get('test_rows', '?')} test rows answered; task metric "
                         f"{primary or 'none'}"
                         + (f": {r['delta_points']:+.1f} points with the adapter" if "delta_points" in r else "")),
             H.table(["model", "test loss", "perplexity"] + [f"{k} %" for k in metric_names], rows)]
    samples = r.get("samples") or []
    if samples:
        parts.append(H.table(["prompt", "expected", "base", "base + adapter"],
                             [[_cut(s.get("prompt")), _cut(s.get("reference")), _cut(s.get("base")),
                               _cut(s.get("adapter"))] for s in samples], wrap=True))
    return parts


def fuse(paths: RunPaths) -> list:
    folders = sorted(p for p in paths.root.glob("fused*") if (p / MANIFEST).is_file())
    if not folders:
        raise NotRun("fuse")
    rows, parts = [], []
    for folder in folders:
        m = json.loads((folder / MANIFEST).read_text())
        rep, surv = m.get("report") or {}, m.get("survival") or {}
        layers, e2e = surv.get("layers") or {}, surv.get("end_to_end") or {}
        mode = "--de-quantize" if m.get("dequantized") else "--no-dequantize"
        rows.append([f"{folder.name}/", mode + (" --rebase" if m.get("rebased") else ""),
                     (m.get("quantization") and json.dumps(m["quantization"])) or m.get("dtype", ""),
                     _mb(rep.get("fused") or (m.get("outputs") or {}).get("size_bytes")),
                     _num(rep.get("bits_per_weight")), _num(layers.get("mean_survival")),
                     _num(layers.get("min_survival")), _num(e2e.get("kl_trained_vs_fused"), 8),
                     _num(e2e.get("kl_trained_vs_base"), 4),
                     _verdict(surv)])
        if rep.get("explanation"):
            parts.append(H.preformatted(f"{folder.name}/\n" + "\n".join(rep["explanation"])))
    table = H.table(["folder", "fuse", "dtype / quantization", "size", "bits per weight", "mean layer survival",
                     "min layer survival", "KL(trained || fused)", "KL(trained || base)", "adapter"], rows)
    return [H.paragraph("Survival: how much of the adapter's change each fused layer keeps (1.0: all); end to "
                        "end, the fused model's KL to base + adapter against the base's."), table, *parts]


def _verdict(survival: dict) -> str:
    """07's end-to-end verdict: `lost` is None when the check was not run (a re-quantized fuse of a
    large model without --strict)."""
    if not survival or survival.get("lost", False) is None:
        return "not measured"
    return "LOST" if survival["lost"] else "survived"


def exports(paths: RunPaths) -> list:
    gguf = _manifest(paths.gguf, "gguf")
    files = (gguf.get("outputs") or {}).get("files") or {}
    bpw = {f.get("file"): f.get("bits_per_weight") for f in files.values()}
    report_path = paths.verify / "report.json"
    if not report_path.is_file():
        rows = [[f.get("file"), f.get("type"), _mb(f.get("size_bytes")), _num(f.get("bits_per_weight"))]
                for f in files.values()]
        return [H.table(["file", "type", "size", "bits per weight"], rows),
                H.paragraph("not verified yet (KL, top-1, task metric): `make verify`", "note")]
    report = json.loads(report_path.read_text())
    primary = report.get("primary_metric")
    failed = {f.split(":", 1)[0] for f in report.get("failures", [])}
    models = report.get("models", [])
    # The fused MLX model is what every GGUF is measured against (reports before `key`: the first MLX row).
    mlx = next((r for r in models if r.get("key") == "MLX"), None) or next(
        (r for r in models if r["file"].endswith("(MLX)")), {})
    reference = (mlx.get("metric") or {}).get(primary) if primary else None
    rows, points = [], []
    for r in models:
        metric = (r.get("metric") or {}).get(primary) if primary else None
        is_mlx = r["file"].endswith("(MLX)")
        names = [] if is_mlx else files_of(r)
        rows.append([r["file"], type_key(r) if not is_mlx else r.get("type", "MLX"), _mb(r.get("size_bytes")),
                     _num(bpw.get(names[0])) if len(names) == 1 else "", _num(r.get("kl"), 8),
                     _num(r.get("top1_percent")), _num(r.get("perplexity")), _num(metric),
                     "reference" if is_mlx else ("FAILED" if failed & {r["file"], *names} else "passed")])
        if not is_mlx:
            points.append({"label": type_key(r), "size_mb": r["size_bytes"] / 1e6, "kl": r.get("kl"), "metric": metric})
    parts = [H.paragraph(f"{report.get('rows_compared', '?')} test rows compared token by token, "
                         f"{report.get('rows_answered', '?')} answered; "
                         f"{'all passed' if report.get('passed') else 'FAILURES below'}."),
             H.table(["file", "type", "size", "bits per weight", "KL to MLX", "top-1 %", "perplexity",
                      f"{primary or 'metric'} %", "verify"], rows)]
    from .plots import size_vs_quality

    png = size_vs_quality(points, primary, reference)
    if png:
        parts.append(H.figure_png(png, "GGUF size vs quality: KL and task metric against file size"))
    for f in report.get("failures", []):
        parts.append(H.paragraph(f, "bad"))
    for n in report.get("notes", []):
        parts.append(H.paragraph(n, "note"))
    return parts


def runtimes(paths: RunPaths) -> list:
    """What `make install` / `mlx-pipeline serve` would pick now (pipeline/export_choice.py, the same code).
    LM Studio loads no LoRA, so a base + LoRA pair is never its choice."""
    if not (paths.verify / "report.json").is_file():
        raise NotRun("verify", "chosen from 10 verify's measurements:")
    rows = []
    for runtime, allow_pair, use in (("LM Studio", False, "make install"),
                                     ("Ollama", True, "make install (writes the Modelfile)"),
                                     ("llama.cpp", True, f"mlx-pipeline serve --run {paths.cfg.run}")):
        try:
            c = choose_export(paths.cfg, allow_pair=allow_pair)
            rows.append([runtime, " + ".join(f.name for f in c.files), c.type, _mb(c.size_bytes), use, c.reason])
        except PipelineError as e:
            rows.append([runtime, "none", "", "", "", str(e)])
    parts = [H.table(["runtime", "file(s)", "type", "size", "how", "why"], rows)]
    installed = _read_json(paths.root / "install" / MANIFEST)
    if installed:
        placed = [[p.get("target"), p.get("path"), p.get("how")]
                  for p in (installed.get("outputs") or {}).get("installed") or []]
        parts += [H.paragraph(f"installed by `make install` ({installed.get('created', '?')}):"),
                  H.table(["target", "path", "how"], placed)]
    return parts


def timings(paths: RunPaths) -> list:
    rows, total = [], 0.0
    for m in _manifests(paths.root):
        seconds = m.get("seconds")
        total += seconds if isinstance(seconds, (int, float)) else 0
        rows.append([m.get("phase", "?"), f"{m['_folder']}/", m.get("created", ""), _num(seconds, 1),
                     _clock(seconds)])
    if not rows:
        raise NotRun("demo", "no phase has finished;")
    rows.append(["total", "", "", round(total, 1), _clock(total)])
    return [H.table(["phase", "output", "finished", "seconds", "h:mm:ss"], rows)]


# Results first; the long configuration table last.
SECTIONS = {"Overview": overview, "Data": data, "Training": training, "Evaluation: base vs adapter": evaluation,
            "Fuse: size and survival": fuse, "GGUF exports": exports, "Which file to load": runtimes,
            "Timings": timings, "Configuration": configuration}


# --------------------------------------------------------------------------------------------
# Reading helpers


def _manifests(root: Path) -> list[dict]:
    """Every phase manifest of the run, in the order the phases finished."""
    found = []
    for path in root.glob(f"*/{MANIFEST}"):
        m = _read_json(path)
        if isinstance(m, dict):
            found.append({**m, "_folder": path.parent.name})
    return sorted(found, key=lambda m: (str(m.get("created", "")), m.get("phase", "")))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a killed run
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v) -> str:
    return "?" if v is None else f"{v:.4g}"


def _cut(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "…"


def _clock(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    from .progress import clock

    return clock(seconds)
