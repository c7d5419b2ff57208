"""Render bench/results/<machine>.json as the Markdown table the README quotes.

    python -m bench.report            # this machine's results -> bench/results/<machine>.md
    python -m bench.report FILE.json  # another machine's
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import RESULTS, machine_name

COLUMNS = ("wall_s", "cpu_s", "peak_rss_gb", "trained_tokens_per_s", "final_train_loss", "seconds_per_file")


def _cell(side: dict, key: str) -> str:
    v = side.get(key)
    return "" if v is None else f"{v:g}"


def render(data: dict) -> str:
    m = data["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {m['system']}; Python {m['python']}.",
             "Ratios are ours / anchor (below 1.0: ours faster or smaller); medians of interleaved runs.", ""]
    for name, row in data["benchmarks"].items():
        lines += [f"### {name}", "", row.get("what", ""), ""]
        if "ours" not in row:  # a measurement of another shape (e.g. one step's timings): as recorded
            lines += ["```", json.dumps({k: v for k, v in row.items() if k != "what"}, indent=1), "```", ""]
            continue
        keys = [k for k in COLUMNS if k in row["ours"] or k in row.get("anchor", {})]
        keys += [k for k in row["ours"] if k not in keys and k not in ("label", "runs_wall_s")
                 and isinstance(row["ours"][k], (int, float))]
        lines.append("| | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        lines.append(f"| ours: {row['ours'].get('label', '')} | "
                     + " | ".join(_cell(row["ours"], k) for k in keys) + " |")
        if "anchor" in row:
            lines.append(f"| anchor: {row['anchor'].get('label', '')} | "
                         + " | ".join(_cell(row["anchor"], k) for k in keys) + " |")
            lines.append("| **ratio** | " + " | ".join(_cell(row.get("ratio", {}), k) for k in keys) + " |")
        for k, v in row.items():
            if k not in ("what", "ours", "anchor", "ratio", "repeats", "measured_at"):
                lines.append(f"\n{k}: {json.dumps(v)}")
        lines += ["", f"({row['repeats']} run(s) each, {row['measured_at']})", ""]
    return "\n".join(lines)


def main(results: str | None = None) -> None:
    path = Path(results) if results else RESULTS / f"{machine_name()}.json"
    text = render(json.loads(path.read_text()))
    out = path.with_suffix(".md")
    out.write_text(text + "\n")
    print(text)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
