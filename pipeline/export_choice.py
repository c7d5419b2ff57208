"""Which verified export a user should load: read from 10 verify's report, never guessed.

Default: the smallest file whose task metric is within `max_metric_drop` points of the MLX
model's and whose KL to it is at most `max_kl` (sizes within 1 % count as equal: the lower KL
wins). `type_name` or `file` overrides the choice; a file that failed verify is refused unless
`force`. A base GGUF + LoRA GGUF pair is one export (`Choice.lora`). Used by 11 install and by `serve`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MissingInputError, PipelineError
from .manifest import MANIFEST, read_manifest
from .paths import RunPaths

SAME_SIZE = 0.01  # relative size difference that does not make a file "smaller"


@dataclass
class Choice:
    gguf: Path  # the file to load (for a pair: the base GGUF)
    lora: Path | None  # the LoRA GGUF of a base + LoRA pair
    type: str
    row: dict  # its row of verify/report.json
    reason: str
    reference: dict = field(default_factory=dict)  # the MLX model's row

    @property
    def files(self) -> list[Path]:
        return [self.gguf] + ([self.lora] if self.lora else [])

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def load_report(cfg) -> dict:
    """verify/report.json of the run, checked against the GGUF files it measured."""
    paths = RunPaths(cfg)
    report_path = paths.verify / "report.json"
    if not report_path.is_file():
        raise MissingInputError(
            f"No verify report at {report_path}: the export to install is chosen from 10 verify's "
            "measurements. Run `make verify` (or `mlx-pipeline verify`) first.")
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as e:
        raise MissingInputError(f"{report_path} is corrupt ({e}). Run `make verify` again.") from None
    gguf = read_manifest(paths.gguf, "gguf")  # also re-checks the GGUF files' hashes
    if (paths.verify / MANIFEST).is_file():
        measured = read_manifest(paths.verify, "verify").get("inputs", {}).get("gguf", {})
        now = {Path(f["path"]).name: f["sha256"] for f in gguf["outputs"]["files"].values()}
        changed = sorted(n for n, sha in measured.items() if now.get(n, sha) != sha)
        if changed:
            raise PipelineError(f"{', '.join(changed)} changed after 10 verify measured it. Run `make verify` "
                                "(or `mlx-pipeline verify`) again before installing.")
    return report


def choose_export(cfg, type_name: str | None = None, file: str | None = None, force: bool = False,
                  allow_pair: bool = True) -> Choice:
    report = load_report(cfg)
    paths = RunPaths(cfg)
    rows = [r for r in report["models"] if not r["file"].endswith("(MLX)")]
    if not allow_pair:
        rows = [r for r in rows if len(files_of(r)) == 1]
    reference = next((r for r in report["models"] if r["file"].endswith("(MLX)")), {})
    primary = report.get("primary_metric")
    failed = {f.split(":", 1)[0] for f in report.get("failures", [])}

    if file or type_name:
        row = _pick(rows, type_name, file)
        reason = f"{'--file' if file else '--type'} {file or type_name}"
    else:
        row, reason = _best(rows, reference, primary, cfg.install.max_metric_drop, cfg.install.max_kl)
    names = files_of(row)
    failed_as = {row["file"], *names}  # a pair's failures are named "base + lora"
    if failed & failed_as:
        problems = [f for f in report["failures"] if f.split(":", 1)[0] in failed_as]
        if not force:
            raise PipelineError(f"{row['file']} failed 10 verify: {' '.join(problems)} Refused; pass --force "
                                "to install it anyway, or choose another file (--type).")
        reason += " (it FAILED verify; installed because of --force)"
    files = [paths.gguf / n for n in names]
    for f in files:
        if not f.is_file():
            raise MissingInputError(f"{f} is in the verify report but not on disk. Run `make gguf verify` again.")
    return Choice(files[0], files[1] if len(files) > 1 else None, type_key(row), row, reason, reference)


def _pick(rows: list[dict], type_name: str | None, file: str | None) -> dict:
    for r in rows:
        if file and (r["file"] == Path(file).name or Path(file).name in files_of(r)):
            return r
        if type_name and type_key(r) == type_name.upper():
            return r
    what = f"--file {file}" if file else f"--type {type_name}"
    verified = ", ".join(f"{type_key(r)} ({r['file']})" for r in rows)
    raise PipelineError(f"{what}: no such verified export. Verified: {verified}.")


def files_of(row: dict) -> list[str]:
    """The GGUF files of a verified export: one, or a base GGUF and its LoRA GGUF (10 verify records
    them; reports written before it did: read off the row's name, `base + lora`)."""
    return row.get("files") or row["file"].split(" + ")


def type_key(row: dict) -> str:
    """What --type matches: Q4_K_M, Q4_K_M-IMATRIX, Q4_1-NATIVE, F16, F16+LORA, Q4_1-NATIVE-BASE+LORA:
    the key 10 verify recorded from 09's manifest (pipeline/gguf_kinds.py). Reports written before
    kinds were recorded: read off the file name (<run>-<TYPE>[-imatrix|-native].gguf)."""
    if row.get("key"):
        return row["key"].upper()
    if " + " in row["file"]:
        return "F16+LORA"
    parts = Path(row["file"]).stem.split("-")
    return "-".join(parts[-2:] if parts[-1] in ("imatrix", "native") else parts[-1:]).upper()


def _best(rows: list[dict], reference: dict, primary: str | None, max_drop: float, max_kl: float) -> tuple[dict, str]:
    ref_metric = (reference.get("metric") or {}).get(primary) if primary else None
    ok, why_not = [], []
    for r in rows:
        metric = (r.get("metric") or {}).get(primary) if primary else None
        if r.get("kl") is None or r["kl"] > max_kl:
            why_not.append(f"{type_key(r)} KL {_fmt(r.get('kl'))} > {max_kl:g}")
        elif ref_metric is not None and (metric is None or ref_metric - metric > max_drop):
            why_not.append(f"{type_key(r)} {primary} {_fmt(metric)} % (MLX {ref_metric:.1f} %)")
        else:
            ok.append(r)
    if not ok:
        raise PipelineError(
            f"No verified export is within install.max_metric_drop = {max_drop:g} points of the MLX model's "
            f"{primary or 'metric'} and install.max_kl = {max_kl:g}: {'; '.join(why_not)}. Pick one with --type "
            "(or raise the limits), or export more precise types (gguf.quantizations, e.g. Q8_0).")
    # Files within SAME_SIZE of the smallest count as one size (an imatrix file carries a few hundred
    # bytes of metadata more than the plain one): among them the lowest KL wins.
    smallest = min(r["size_bytes"] for r in ok)
    row = min((r for r in ok if r["size_bytes"] <= smallest * (1 + SAME_SIZE)),
              key=lambda r: (r["kl"], r["size_bytes"]))
    metric = (row.get("metric") or {}).get(primary) if primary else None
    reason = (f"smallest verified export within {max_drop:g} points of the MLX model's {primary} and KL <= {max_kl:g}: "
              f"{type_key(row)}, {row['size_bytes'] / 1e6:.1f} MB, KL {_fmt(row['kl'])}"
              + (f", {primary} {metric:.1f} % (MLX {ref_metric:.1f} %)" if metric is not None else ""))
    if why_not:
        reason += f"; left out: {'; '.join(why_not)}"
    return row, reason


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"
