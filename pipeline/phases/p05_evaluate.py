"""05 Evaluate base vs base + adapter on the test split: loss, perplexity, task metric, samples.

The task metric generates an answer (greedy) for each test row and scores it against the
row's reference answer (pipeline/metrics.py: JSON match for JSON answers, else exact match).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click

from ..agreement import mlx_answers
from ..data.formats import prompt_and_answer
from ..errors import DataError
from ..fsio import sha256_file, write_json, write_text
from ..manifest import read_adapter_manifest, read_manifest, write_manifest
from ..metrics import score_answers
from ..paths import RunPaths
from .common import done, start_phase


@dataclass
class EvalResult:
    path: Path
    base: dict | None
    adapter: dict
    primary: str | None
    delta_points: float | None


def evaluate(cfg, skip_base: bool = False, paths: RunPaths | None = None, fused: Path | None = None) -> EvalResult:
    """`paths`: a sweep trial's folders (default: the run's). `fused`: score this model folder, the
    adapter already merged into it, in place of base + adapter (a sweep's --merge)."""
    from mlx_lm.tuner.utils import load_adapters

    from ..modeling import load_model

    started = start_phase(cfg, "05 evaluate", ["eval"])
    paths = paths or RunPaths(cfg)
    read_manifest(paths.data, "data")
    choice = paths.adapter_choice
    read_adapter_manifest(choice.source, choice.kind)
    click.echo(choice.describe())
    rows = _read_rows(paths.data / "test.jsonl")
    if not rows:
        raise DataError(f"{paths.data / 'test.jsonl'} is empty: set data.test_fraction > 0 or add test.jsonl, "
                        "then `make data`.")

    scored = [r for r in rows if "text" not in r][: cfg.eval.max_samples]
    results = {}
    if not skip_base or fused is None:
        model, tokenizer, _ = load_model(paths.train_base, cfg.train.compute_dtype)
    if not skip_base:
        click.echo("scoring the base model...")
        results["base"] = _score(model, tokenizer, rows, scored, cfg)
    if fused is None:
        load_adapters(model, str(choice.folder))
        model.eval()
        click.echo("scoring base + adapter...")
    else:
        model, tokenizer, _ = load_model(fused, cfg.train.compute_dtype)
        click.echo(f"scoring the fused model {fused}...")
    results["adapter"] = _score(model, tokenizer, rows, scored, cfg)

    primary = results["adapter"]["metric"].get("primary") if scored else None
    delta = None
    if primary and "base" in results:
        delta = round(results["adapter"]["metric"][primary] - results["base"]["metric"][primary], 1)
    samples = _samples(scored, results, cfg.eval.show_samples)
    report = {"test_rows": len(rows), "scored_rows": len(scored), "primary_metric": primary,
              "delta_points": delta,
              **{k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()},
              "samples": samples}
    out = paths.eval
    write_json(out / "results.json", report)
    table = _markdown(report)
    write_text(out / "results.md", table + "\n" + _samples_markdown(samples))
    write_manifest(out, "05_evaluate", cfg, started,
                   inputs={"adapter": str(choice.folder), "adapter_sha256": sha256_file(choice.file),
                           "test_sha256": sha256_file(paths.data / "test.jsonl")},
                   outputs={"results": str(out / "results.json"), "table": str(out / "results.md")},
                   adapter=choice.record(), **({"fused": str(fused)} if fused is not None else {}))
    click.echo(table)
    for s in samples:
        click.echo(f"\nprompt:   {s['prompt']}\nexpected: {s['reference']}")
        for k in ("base", "adapter"):
            if k in s:
                click.echo(f"{k:>8}: {_one_line(s[k])}")
    if delta is not None:
        done(f"\ntask metric ({primary}): base {results['base']['metric'][primary]:.1f}% -> "
             f"adapter {results['adapter']['metric'][primary]:.1f}% ({delta:+.1f} points); results in {out}")
    else:
        done(f"results in {out}")
    return EvalResult(out, results.get("base"), results["adapter"], primary, delta)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score(model, tokenizer, rows, scored, cfg) -> dict:
    loss = split_loss(model, tokenizer, rows, cfg.train.batch_size, cfg.data.max_seq_length, cfg.train.mask)
    out = {"test_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}
    if scored:
        answers = mlx_answers(model, tokenizer, [prompt_and_answer(r)[0] for r in scored], cfg.eval.max_tokens)
        out["metric"] = score_answers(answers, [prompt_and_answer(r)[1] for r in scored])
        out["answers"] = answers
    return out


def split_loss(model, tokenizer, rows, batch_size, max_len, mask: str) -> float:
    """Mean loss per trained token over the whole split: train.mask's tokens, as 04 validates."""
    from ..batching import validation_batches
    from ..data.trained_tokens import encode_rows
    from ..trainer import evaluate as evaluate_loss

    encoded = encode_rows(rows, tokenizer, mask)
    batches = validation_batches([len(e.ids) for e in encoded], min(batch_size, len(rows)), -1)
    return evaluate_loss(model, encoded, batches, max_len)


def _one_line(text: str, width: int = 160) -> str:
    """Answers may span many lines; show them as one, cut to the terminal."""
    flat = " ⏎ ".join(line for line in text.splitlines() if line.strip())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _samples(scored, results, n) -> list[dict]:
    out = []
    for i, row in enumerate(scored[:n]):
        messages, reference = prompt_and_answer(row)
        s = {"prompt": messages[-1]["content"], "reference": reference}
        for k, v in results.items():
            s[k] = v["answers"][i]
        out.append(s)
    return out


def _markdown(report) -> str:
    primary = report["primary_metric"]
    lines = ["| model | test loss | perplexity | " + (f"{primary} % | json_valid % |" if primary else ""),
             "|---|---|---|" + ("---|---|" if primary else "")]
    for k in ("base", "adapter"):
        if k in report:
            r = report[k]
            row = f"| {'base' if k == 'base' else 'base + adapter'} | {r['test_loss']:.3f} | {r['perplexity']:.2f} |"
            if primary:
                row += f" {r['metric'][primary]:.1f} | {r['metric'].get('json_valid', float('nan')):.1f} |"
            lines.append(row)
    return "\n".join(lines)


def _samples_markdown(samples) -> str:
    parts = ["\n## Samples\n"]
    for s in samples:
        parts.append(f"- **prompt**: {s['prompt']}\n  - expected: `{s['reference']}`")
        for k in ("base", "adapter"):
            if k in s:
                parts.append(f"  - {k}: `{_one_line(s[k])}`")
    return "\n".join(parts) + "\n"
