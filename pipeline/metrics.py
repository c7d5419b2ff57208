"""The task metric: how many generated answers match the reference answers.

Exact string match always; when the references are JSON (the sample task), also whether the
prediction is valid JSON and whether it parses to the same value, which is the headline number
(key order and spacing do not matter, the extracted values do).
"""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\s*```$", re.DOTALL)
_MISSING = object()


def parse_json(text: str):
    """The JSON value in `text` (bare, or inside a ```json fence), or _MISSING."""
    text = text.strip()
    if m := _FENCE.match(text):
        text = m.group(1)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return _MISSING


def _pct(k: int, n: int) -> float:
    return round(100.0 * k / n, 1) if n else 0.0


def score_answers(predictions: list[str], references: list[str]) -> dict:
    """Percentages (0-100, 1 decimal) and counts of matching answers; `primary` names the headline key."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    n = len(references)
    counts = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references))}
    refs = [parse_json(r) for r in references]
    is_json = n > 0 and all(r is not _MISSING for r in refs)
    if is_json:
        preds = [parse_json(p) for p in predictions]
        counts["json_valid"] = sum(p is not _MISSING for p in preds)
        counts["json_match"] = sum(p is not _MISSING and p == r for p, r in zip(preds, refs))
    out = {"n": n, "primary": "json_match" if is_json else "exact_match"}
    for key, k in counts.items():
        out[key] = _pct(k, n)
        out[f"{key}_count"] = k
    return out
