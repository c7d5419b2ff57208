"""Self-contained HTML pages (run and sweep reports): one file, images embedded, no network.

Escapes every value it is given; callers pass plain strings and numbers, or `Raw` for markup
they built with these same functions.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .fsio import write_text

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.6em;overflow:auto;max-height:30em}img{max-width:100%;border:1px solid #eee}
.note{color:#666}.bad{color:#b00}.good{color:#070}
table.wrap td{overflow-wrap:anywhere}
"""


class Raw(str):
    """Markup that is already safe (built by this module); inserted as is."""


def esc(value) -> str:
    return value if isinstance(value, Raw) else html.escape("" if value is None else str(value))


def _cell(value, tag: str) -> str:
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = f"{value:.4g}" if isinstance(value, float) else value
    return f"<{tag}{' class=num' if num else ''}>{esc(text)}</{tag}>"


def table(header: list, rows: list[list], wrap: bool = False) -> Raw:
    """`wrap`: cells may break anywhere (long unspaced text such as JSON answers), so the table fits the page."""
    head = "".join(_cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(_cell(v, "td") for v in row) + "</tr>" for row in rows)
    return Raw(f"<table{' class=wrap' if wrap else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def figure_png(png: bytes, alt: str) -> Raw:
    """An image embedded as a data: URI (the page stays one file)."""
    data = base64.b64encode(png).decode("ascii")
    return Raw(f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">')


def paragraph(text, cls: str | None = None) -> Raw:
    return Raw(f"<p{f' class={cls}' if cls else ''}>{esc(text)}</p>")


def preformatted(text: str) -> Raw:
    return Raw(f"<pre>{esc(text)}</pre>")


def page(title: str, sections: list[tuple[str, list]]) -> str:
    """A whole page: `sections` is [(heading, [parts...])]; parts are Raw markup or plain text."""
    body = []
    for heading, parts in sections:
        body.append(f'<section><h2 id="{esc(heading.lower().replace(" ", "-"))}">{esc(heading)}</h2>')
        body += [p if isinstance(p, Raw) else paragraph(p) for p in parts]
        body.append("</section>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(body)}</body></html>\n")


def write_page(path: str | Path, text: str) -> Path:
    """Atomic write: a killed run leaves the previous page, never half of one."""
    write_text(path, text)
    return Path(path)
