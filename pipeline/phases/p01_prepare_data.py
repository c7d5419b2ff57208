"""Phase 01: validate, deduplicate and split the training data; token statistics.

Input (`data.source`): 'sample' (the bundled task), one .jsonl file split by seed, or a folder with
train.jsonl, valid.jsonl[, test.jsonl]. Every row is checked before anything is written, so bad
data fails here with file:line reasons instead of mid-training. Output: <run>/data/{train,valid,
test}.jsonl in the format mlx-lm reads, and manifest.json (written last: it marks completion). The
statistics count each row's tokens and, under train.mask, how many of them are trained and masked
(pipeline/data/trained_tokens.py, the encoding training uses).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..data.formats import read_rows
from ..data.sample_task import NAME as SAMPLE_NAME
from ..data.sample_task import generate_rows
from ..data.trained_tokens import Encoded, RowEncoder
from ..errors import DataError
from ..fsio import atomic_path, check_not_inside, jsonl_text, sha256_file
from ..manifest import read_manifest, write_manifest
from ..paths import RunPaths
from .common import done, start_phase

SPLITS = ("train", "valid", "test")
MAX_ERRORS = 20
MAX_MANIFEST_ROWS = 1000  # overlong rows named in the manifest; the rest are counted
MIN_TRAIN = 4
ACCEPTED = "Accepted: 'sample', a .jsonl file, or a folder with train.jsonl, valid.jsonl[, test.jsonl]."

Item = tuple[str, dict]  # (where it came from: 'file:line' or 'sample row N', the row)


@dataclass
class PrepareResult:
    out_dir: Path
    counts: dict[str, int]
    stats: dict[str, dict]
    format: str = "chat"
    removed: dict = field(default_factory=dict)


def _fail(errors: list[str], what: str, hint: str = ""):
    lines = errors[:MAX_ERRORS]
    if len(errors) > MAX_ERRORS:
        lines.append(f"... and {len(errors) - MAX_ERRORS} more")
    raise DataError(f"{len(errors)} {what}; nothing was written.{hint}\n  " + "\n  ".join(lines))


def _split(items: list[Item], cfg) -> dict[str, list[Item]]:
    """Shuffle by seed and cut valid and test off the front (at least 1 row each when asked for)."""
    items = list(items)
    random.Random(cfg.seed).shuffle(items)
    n = len(items)

    def size(fraction):
        k = round(n * fraction)
        return max(k, 1) if fraction > 0 and n >= 3 else k

    n_valid, n_test = size(cfg.data.valid_fraction), size(cfg.data.test_fraction)
    return {
        "valid": items[:n_valid],
        "test": items[n_valid:n_valid + n_test],
        "train": items[n_valid + n_test:],
    }


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def _dedupe(items: list[Item]) -> tuple[list[Item], int]:
    """Drop exact duplicate rows (same canonical JSON); return (kept, dropped)."""
    seen, kept = set(), []
    for where, row in items:
        if (k := _key(row)) not in seen:
            seen.add(k)
            kept.append((where, row))
    return kept, len(items) - len(kept)


def _deduplicate(splits: dict[str, list[Item]], duplicates: dict) -> dict:
    """Dedupe each split in place (counts into `duplicates`), then drop valid/test rows found in
    train, which would flatter the validation loss; return those counts per split."""
    in_train = {}
    for s in SPLITS:
        splits[s], n = _dedupe(splits[s])
        if n:
            duplicates[s] = n
    train_keys = {_key(r) for _, r in splits["train"]}
    for s in ("valid", "test"):
        kept = [(w, r) for w, r in splits[s] if _key(r) not in train_keys]
        if len(kept) < len(splits[s]):
            in_train[s] = len(splits[s]) - len(kept)
        splits[s] = kept
    return in_train


def load_input(cfg) -> tuple[dict[str, list[Item]], str, dict, dict]:
    """(split -> rows, format, manifest inputs, duplicates removed per split or 'input')."""
    source = cfg.data.source
    if source == "sample":
        rows = generate_rows(cfg.data.sample_rows, cfg.seed)
        items = [(f"sample row {i + 1}", r) for i, r in enumerate(rows)]
        return _split(items, cfg), "chat", {"sample": SAMPLE_NAME, "rows": len(rows), "seed": cfg.seed}, {}

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        files = {"input": path}
    elif path.is_dir():
        missing = [f"{s}.jsonl" for s in ("train", "valid") if not (path / f"{s}.jsonl").is_file()]
        if missing:
            raise DataError(f"data.source = '{source}': the folder has no {' or '.join(missing)}. {ACCEPTED}")
        files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()}
    else:
        problem = "not found" if not path.exists() else "not a .jsonl file or a folder"
        raise DataError(f"data.source = '{source}': {problem}. {ACCEPTED}")

    read, errors, fmt, first = {}, [], None, None
    for key, f in files.items():
        rows, errs, file_fmt = read_rows(f)
        errors += errs
        if fmt and file_fmt and file_fmt != fmt:
            errors.append(f"{f}: format '{file_fmt}' differs from {first}'s format '{fmt}'")
        fmt, first = fmt or file_fmt, first or f.name
        read[key] = [(f"{f}:{lineno}", row) for lineno, row in rows]
    if errors:
        _fail(errors, "error(s) in the input data")
    if fmt is None:
        raise DataError(f"data.source = '{source}': no rows found (only blank lines).")
    inputs = {k: {"path": str(f), "sha256": sha256_file(f)} for k, f in files.items()}

    if "input" in read:
        # Dedupe before splitting, so the same row never lands in train and test.
        items, dropped = _dedupe(read["input"])
        return _split(items, cfg), fmt, inputs, {"input": dropped} if dropped else {}
    return {s: read.get(s, []) for s in SPLITS}, fmt, inputs, {}


def load_tokenizer(cfg):
    base = RunPaths(cfg).base
    read_manifest(base, "base")  # fails naming `make base` when the base model is not there yet
    from transformers import AutoTokenizer  # slow import; keeps `--help` fast

    return AutoTokenizer.from_pretrained(str(base))


def split_stats(encoded: list[Encoded]) -> dict:
    """rows, tokens (the chat template's for chat/completions rows, text + eos for text rows), mean,
    p95, max per row, and trained/masked: the tokens whose loss counts under train.mask and the others
    (counted before mlx-lm's truncation to max_seq_length at training)."""
    trained = sum(e.trained for e in encoded)
    lengths = [len(e.ids) for e in encoded]
    extra = {"trained": trained, "masked": sum(lengths) - trained}
    if not lengths:
        return {"rows": 0, "tokens": 0, "mean": 0.0, "p95": 0, "max": 0, **extra}
    s = sorted(lengths)
    return {
        "rows": len(s),
        "tokens": sum(s),
        "mean": round(sum(s) / len(s), 1),
        "p95": s[max(0, math.ceil(0.95 * len(s)) - 1)],  # nearest rank
        "max": s[-1],
        **extra,
    }


def _encode(splits: dict[str, list[Item]], encoder: RowEncoder) -> dict[str, list[Encoded]]:
    """Every row's tokens and trained mask (train.mask), once: lengths are len(ids)."""
    return {s: [encoder.encode(r, where) for where, r in splits[s]] for s in SPLITS}


def _handle_overlong(splits, encoded, encoder, cfg, fmt) -> tuple[dict, dict, list[dict]]:
    """Apply data.overlong in place; return (dropped, truncated) counts per split and the rows
    concerned ({"row": 'file:line', "split", "tokens"}), so that the user can find them."""
    limit, policy = cfg.data.max_seq_length, cfg.data.overlong
    tokenizer = encoder.tokenizer
    lengths = {s: [len(e.ids) for e in encoded[s]] for s in SPLITS}
    over = {s: [i for i, n in enumerate(lengths[s]) if n > limit] for s in SPLITS}
    named = [{"row": splits[s][i][0], "split": s, "tokens": lengths[s][i]} for s in SPLITS for i in over[s]]
    if policy == "error" and named:
        errors = [f"{r['row']}: {r['tokens']} tokens > max_seq_length {limit}" for r in named]
        _fail(errors, "row(s) longer than data.max_seq_length",
              " Raise data.max_seq_length or set data.overlong to drop or truncate.")
    dropped, truncated = {}, {}
    for s in SPLITS:
        if policy == "drop":
            keep = [i for i in range(len(splits[s])) if lengths[s][i] <= limit]
            splits[s] = [splits[s][i] for i in keep]
            encoded[s] = [encoded[s][i] for i in keep]
            dropped[s] = len(over[s])
        elif policy == "truncate":
            truncated[s] = len(over[s])
            if fmt == "text":  # chat rows are truncated by mlx-lm at training time; text we cut here
                for i in over[s]:
                    where, row = splits[s][i]
                    ids = tokenizer.encode(row["text"])[:limit - 1]  # room for the eos training appends
                    row = {**row, "text": tokenizer.decode(ids)}
                    splits[s][i] = (where, row)
                    encoded[s][i] = encoder.encode(row, where)
    return dropped, truncated, named


def prepare_data(cfg) -> PrepareResult:
    started = start_phase(cfg, "01 prepare data", ["data"])
    out_dir = RunPaths(cfg).data
    if cfg.data.source != "sample" and (source := Path(cfg.data.source).expanduser()).exists():
        check_not_inside(out_dir, source, "data.source")

    splits, fmt, inputs, duplicates = load_input(cfg)
    in_train = _deduplicate(splits, duplicates)

    encoder = RowEncoder(load_tokenizer(cfg), cfg.train.mask)
    encoded = _encode(splits, encoder)
    dropped, truncated, overlong_rows = _handle_overlong(splits, encoded, encoder, cfg, fmt)

    if len(splits["train"]) < MIN_TRAIN or not splits["valid"]:
        raise DataError(
            f"After removing duplicates and overlong rows, train has {len(splits['train'])} rows "
            f"(need at least {MIN_TRAIN}) and valid has {len(splits['valid'])} (need at least 1); "
            "nothing was written. Add rows, or raise data.valid_fraction / data.max_seq_length."
        )

    stats = {s: split_stats(encoded[s]) for s in SPLITS}
    removed = {"duplicates": duplicates, "in_train": in_train, "overlong": {k: v for k, v in dropped.items() if v}}
    texts = {s: jsonl_text(r for _, r in splits[s]) for s in SPLITS if splits[s]}
    # The whole folder is written under a temporary name and swapped in complete, manifest included:
    # a crash leaves the previous splits or none, never a mix of old and new.
    with atomic_path(out_dir, expected_bytes=sum(len(t.encode()) for t in texts.values()),
                     what="the data splits") as tmp:
        outputs = _write(tmp, out_dir, texts)
        write_manifest(
            tmp, "01_prepare_data", cfg, started, inputs=inputs, outputs=outputs, stats=stats, format=fmt,
            removed=removed, train_mask=cfg.train.mask,
            overlong={"policy": cfg.data.overlong, "max_seq_length": cfg.data.max_seq_length,
                      "truncated": {k: v for k, v in truncated.items() if v},
                      "rows": overlong_rows[:MAX_MANIFEST_ROWS],
                      "rows_not_listed": _more(overlong_rows, MAX_MANIFEST_ROWS)},
        )
    _summary(out_dir, fmt, stats, removed, truncated, cfg)
    _name_overlong(overlong_rows, cfg)
    return PrepareResult(out_dir, {s: len(splits[s]) for s in SPLITS}, stats, fmt, removed)


def _write(tmp: Path, out_dir: Path, texts: dict[str, str]) -> dict:
    tmp.mkdir()
    outputs = {}
    for s in SPLITS:
        if s not in texts:
            # mlx-lm fails on an empty .jsonl (it reads the format from row 0): leave it out.
            outputs[s] = {"path": None, "rows": 0, "sha256": None}
            continue
        f = tmp / f"{s}.jsonl"
        f.write_bytes(texts[s].encode())
        outputs[s] = {"path": str(out_dir / f.name), "rows": texts[s].count("\n"), "sha256": sha256_file(f)}
    return outputs


def _more(items: list, shown: int) -> int:
    return max(len(items) - shown, 0)


def _name_overlong(rows: list[dict], cfg) -> None:
    """Print where the dropped (or truncated) rows are, up to MAX_ERRORS of them."""
    if not rows:
        return
    verb = "truncated" if cfg.data.overlong == "truncate" else "dropped"
    for r in rows[:MAX_ERRORS]:
        click.echo(f"  {verb}: {r['row']} ({r['split']}): {r['tokens']} tokens > max_seq_length "
                   f"{cfg.data.max_seq_length}")
    if more := _more(rows, MAX_ERRORS):
        click.echo(f"  ... and {more} more (all in {RunPaths(cfg).data / 'manifest.json'}, overlong.rows)"
                   if len(rows) <= MAX_MANIFEST_ROWS else f"  ... and {more} more")


def _summary(out_dir, fmt, stats, removed, truncated, cfg):
    click.echo(f"\nformat: {fmt}; tokens per row counted with the base model's chat template; trained: the "
               f"tokens the loss counts (train.mask: {cfg.train.mask}), masked: the others")
    click.echo(f"{'split':<7}{'rows':>7}{'tokens':>10}{'mean':>8}{'p95':>7}{'max':>7}{'trained':>10}{'masked':>10}")
    for s in SPLITS:
        st = stats[s]
        click.echo(f"{s:<7}{st['rows']:>7}{st['tokens']:>10}{st['mean']:>8}{st['p95']:>7}{st['max']:>7}"
                   f"{st['trained']:>10}{st['masked']:>10}")

    def fmt_counts(d):
        return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "none"

    click.echo(f"duplicates removed: {fmt_counts(removed['duplicates'])}; "
               f"valid/test rows also in train removed: {fmt_counts(removed['in_train'])}")
    limit = f"> {cfg.data.max_seq_length} tokens"
    if cfg.data.overlong == "truncate":
        kept = fmt_counts({k: v for k, v in truncated.items() if v})
        click.echo(f"overlong rows ({limit}) kept for truncation: {kept}")
    else:
        click.echo(f"overlong rows ({limit}) dropped: {fmt_counts(removed['overlong'])}")
    done(f"wrote {out_dir}")
