"""10 Verify every GGUF export against the MLX model it was made from, in llama.cpp itself.

Each file's kind comes from 09's manifest (pipeline/gguf_kinds.py), and with it the reference: the
fused model (fused/) for files made from it, the training base + adapter for a base GGUF + LoRA
GGUF pair (measured together, and alone to show what the LoRA GGUF carries). A .gguf file in gguf/
that 09 did not write is measured against the fused model. For each, on the test split:
- tokenizer and chat template: the GGUF's own chat template (from its metadata, rendered in a
  sandboxed Jinja environment) must equal the trained model's, and llama.cpp's tokenization of the
  rendered conversations must equal the Hugging Face tokenizer's;
- next-token fidelity on the same full-conversation tokens (pipeline/agreement.py, span "all"):
  mean KL(MLX || GGUF) over positions, top-1 agreement and each model's perplexity;
- the task metric (greedy answers scored by pipeline/metrics.py), for the GGUF and for MLX.
MLX runs in float32 (on CPU its quantized layers run dequantized, which is exact); each reference's
log-probabilities and answers are computed once and shared by every file measured against it, and
llama.cpp scores and answers all rows of a file in batched decodes (pipeline/gguf_batch.py). Verify FAILS,
naming the file, when a GGUF does not load, its tokenizer or chat template differs, an unquantized
kind's KL exceeds verify.f16_max_kl, or a pair is not much closer to the trained model than its
base GGUF alone (a LoRA GGUF that is not this run's adapter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import click

from .. import agreement, gguf_kinds, llamacpp
from ..adapter_gguf import adapter_words
from ..data.formats import prompt_and_answer
from ..errors import MissingInputError, PipelineError
from ..fsio import human_size, sha256_file, write_json, write_text
from ..manifest import MANIFEST, is_current, read_adapter_manifest, read_manifest, write_manifest
from ..metrics import score_answers
from ..paths import AdapterChoice, RunPaths
from ..survival import MAX_KL_RATIO

# Chat templates are untrusted input: compiled and rendered in pipeline/untrusted's sandbox, under
# time and size limits (`_jinja` is the compiled template, cached per text).
from ..untrusted.chat_template import compile_template as _jinja  # noqa: F401
from ..untrusted.chat_template import render_chat
from .common import done, start_phase

# The context open_gguf makes is only tokenizer and metadata: scores and answers run in contexts
# sized for them (pipeline/gguf_batch.py).
GGUF_CTX = 64
LORA_CHECK_ROWS = 8  # rows on which a LoRA pair's base is measured alone (_check_lora_carries)


@dataclass
class VerifyResult:
    path: Path
    rows: list[dict] = field(default_factory=list)  # one per GGUF export, then the MLX references
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Reference:
    """A model verify measures GGUFs against (gguf_kinds.FUSED or TRAINED): its HF tokenizer and chat
    template, the MLX model in float32, the conversations compared and the rows answered."""

    name: str
    label: str  # its row in the table
    tokenizer: object  # transformers' tokenizer
    template: str
    model: object  # mlx-lm model in float32
    mlx_tokenizer: object
    compared: list[dict]  # test rows compared token by token
    convs: list[agreement.Conversation]  # the same rows through the reference's chat template
    answered: list[dict]  # test rows answered for the task metric
    scores: agreement.ReferenceScores | None = None  # its log-probabilities on convs, computed once

    @property
    def scorer(self) -> agreement.Scorer:
        if self.scores is None:  # float32 logits, positions x vocabulary: 365 MB for the demo's 24 chats
            self.scores = agreement.reference_scores(agreement.mlx_scorer(self.model), self.convs, "all")
        return self.scores


@dataclass
class Export:
    """One thing verify measures: a GGUF file (with the LoRA GGUF for a pair) and its kind from 09's manifest."""

    path: Path
    kind: gguf_kinds.Kind | None  # None: a .gguf file 09 did not write (measured against the fused model)
    key: str  # what --type matches
    lora: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name + (f" + {self.lora.name}" if self.lora else "")

    @property
    def reference(self) -> str:
        return self.kind.reference if self.kind else gguf_kinds.FUSED


def verify_gguf(cfg) -> VerifyResult:
    started = start_phase(cfg, "10 verify GGUF", ["verify", "eval"])
    paths = RunPaths(cfg)
    out = paths.verify
    (out / MANIFEST).unlink(missing_ok=True)  # a failed verify must not leave an old pass behind
    gguf_manifest = read_manifest(paths.gguf, "gguf")
    fused_manifest = read_manifest(paths.fused, "fuse")
    _check_chain(fused_manifest, read_manifest(paths.hf, "hf"), gguf_manifest)
    llamacpp.check_runtime()
    exports = _exports(paths, gguf_manifest)
    if not exports:
        raise MissingInputError(f"No .gguf files in {paths.gguf}. Run `make gguf` (or `mlx-pipeline gguf`) first.")

    choice = paths.adapter_choice
    trained = any(e.reference == gguf_kinds.TRAINED for e in exports)
    if trained:
        read_adapter_manifest(choice.source, choice.kind)
    _check_adapter(choice, fused_manifest, gguf_manifest, trained)
    click.echo(choice.describe())

    rows, failures, mlx_rows, counts = [], [], [], (0, 0)
    for which in (gguf_kinds.FUSED, gguf_kinds.TRAINED):
        measured = [e for e in exports if e.reference == which]
        if not measured:
            continue
        # While MLX computes the reference, llama.cpp's load of each file is proved in a child.
        with llamacpp.probes_ahead([(e.path, e.lora) for e in measured]):
            ref = _reference(paths, cfg, which)
            counts = max(counts, (len(ref.convs), len(ref.answered)))
            click.echo(f"\nMLX reference: {ref.label} (float32); {len(ref.convs)} test rows compared, "
                       f"{len(ref.answered)} answered")
            mlx_rows.append(_mlx_row(ref, paths, cfg))
        click.echo(f"  its logits on the compared rows, kept for every file: {human_size(ref.scores.nbytes)}")
        for e in measured:
            click.echo(f"\n{e.name}:")
            row, problems = _measure(e, ref, cfg, fused_manifest)
            rows.append(row)
            failures += [f"{e.name}: {p}" for p in problems]
            for p in problems:
                click.secho(f"  FAIL {p}", fg="red")
        del ref  # one MLX model in memory at a time
    rows += mlx_rows
    primary = next((r["metric"].get("primary") for r in mlx_rows if r.get("metric")), None)
    notes = _fusion_note(paths, next((r for r in mlx_rows if r["key"] == "MLX"), {}), fused_manifest)
    notes += imatrix_notes(rows, primary=primary)
    notes += native_notes(gguf_manifest)

    report = {"rows_compared": counts[0], "rows_answered": counts[1], "primary_metric": primary,
              "f16_max_kl": cfg.verify.f16_max_kl, "passed": not failures, "failures": failures, "models": rows,
              "notes": notes}
    table = format_table(rows, primary)
    write_json(out / "report.json", report)
    write_text(out / "report.md", "# GGUF verification\n\n" + table + "\n" + "".join(f"\n> {n}\n" for n in notes)
               + _failures_md(failures))
    click.echo("\n" + table)
    for n in notes:
        click.secho(n, fg="yellow")
    if failures:
        raise PipelineError("verify FAILED:\n" + "\n".join(f"  - {f}" for f in failures)
                            + f"\nReport: {out / 'report.md'}")
    files = sorted({f for e in exports for f in (e.path, e.lora) if f})
    write_manifest(out, "10_verify_gguf", cfg, started,
                   inputs={"gguf": {p.name: sha256_file(p) for p in files}, "fused": str(paths.fused),
                           "test_sha256": sha256_file(paths.data / "test.jsonl")},
                   outputs={"report": str(out / "report.json"), "table": str(out / "report.md")},
                   adapter=fused_manifest.get("adapter") or choice.record())
    done(f"verify passed: {len(exports)} GGUF export(s) match the MLX model they were made from; "
         f"report in {out / 'report.md'}")
    return VerifyResult(out, rows, failures)


def _exports(paths: RunPaths, gguf_manifest: dict) -> list[Export]:
    """What 09 wrote, by the kind it recorded; then any other .gguf in gguf/ (a file put there by
    hand is measured too, against the fused model: verify vouches for every file it finds)."""
    entries = gguf_manifest.get("outputs", {}).get("files", {})
    exports, listed = [], set()
    for key, e in entries.items():
        if "kind" not in e:
            raise PipelineError(f"{paths.gguf / MANIFEST} records no GGUF kinds (written by an older version). "
                                "Run `make gguf` (or `mlx-pipeline gguf`) again.")
        kind = gguf_kinds.get(e["kind"])
        path = paths.gguf / e["file"]
        listed.add(path.name)
        if not kind.standalone or not path.is_file():  # a listed file gone: read_manifest has judged it
            continue
        if kind.pairs_with_lora:
            exports.append(Export(path, kind, e["pair_key"], paths.gguf / e["lora"]))
        else:
            exports.append(Export(path, kind, key.upper()))
    others = [Export(p, None, p.stem.upper()) for p in paths.gguf.glob("*.gguf") if p.name not in listed]
    # Largest first: the unquantized file leads the table.
    return sorted(exports, key=lambda e: (-e.path.stat().st_size, e.name)) + sorted(others, key=lambda e: e.name)


def _reference(paths: RunPaths, cfg, which: str) -> Reference:
    from transformers import AutoTokenizer

    from ..modeling import load_model

    rows = agreement.read_rows(paths.data / "test.jsonl")
    if which == gguf_kinds.TRAINED:
        choice = paths.adapter_choice
        source, label = paths.train_base, f"{paths.train_base.name}/ + {choice.label} (MLX)"
        model, mlx_tokenizer = agreement.load_trained(paths.train_base, choice.folder)
    else:
        source, label = paths.fused, f"{paths.fused.name}/ (MLX)"
        model, mlx_tokenizer, _ = load_model(paths.fused, "float32")
    tok_dir = source if (source / "tokenizer_config.json").is_file() else paths.hf
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    template = _template_str(tokenizer.chat_template)
    if not template:
        raise PipelineError(f"{tok_dir} has no chat template: verify compares chat conversations.")
    convs = agreement.conversations(tokenizer, rows[: cfg.verify.max_rows])  # the trained model's context rule
    return Reference(which, label, tokenizer, template, model, mlx_tokenizer, rows[: cfg.verify.max_rows], convs,
                     rows[: cfg.verify.max_samples])


def _mlx_row(ref: Reference, paths: RunPaths, cfg) -> dict:
    if ref.name == gguf_kinds.TRAINED:
        size = _dir_size(paths.train_base) + _dir_size(paths.adapter)
        row = {"file": ref.label, "key": "MLX+ADAPTER", "type": _mlx_type(paths.train_base) + " + LoRA",
               "path": "training base + adapter (reference of the base + LoRA pairs)"}
    else:
        size = _dir_size(paths.fused)
        row = {"file": ref.label, "key": "MLX", "type": _mlx_type(paths.fused), "path": "MLX fused (reference)"}
    row.update(size_bytes=size, kl=None, top1_percent=None,
               perplexity=agreement.perplexity(ref.scorer, ref.convs, "all"))
    if ref.answered:
        prompts = [prompt_and_answer(r)[0] for r in ref.answered]
        row["metric"] = _score(agreement.mlx_answers(ref.model, ref.mlx_tokenizer, prompts, cfg.eval.max_tokens), ref)
    return row


def _measure(export: Export, ref: Reference, cfg, fused_manifest: dict) -> tuple[dict, list[str]]:
    """Load one GGUF (with its LoRA GGUF) in llama.cpp and measure it against its reference.
    Problems are returned, not raised, so that every file gets reported."""
    files = [export.path] + ([export.lora] if export.lora else [])
    row = {"file": export.name, "files": [f.name for f in files], "key": export.key, "type": "?",
           "size_bytes": sum(f.stat().st_size for f in files),
           "path": export.kind.made_by(fused_manifest) if export.kind else "not written by 09 gguf",
           "kind": export.kind.name if export.kind else None, "kl": None, "top1_percent": None, "perplexity": None}
    try:
        llm = llamacpp.open_gguf(export.path, GGUF_CTX, cfg.seed, lora=export.lora, logits_all=False)
    except PipelineError as e:
        return row, [str(e)]
    meta = agreement.gguf_metadata(llm)
    row["type"] = meta["type"] + (" + LoRA" if export.lora else "")
    problems: list[str] = []
    try:
        with llamacpp.captured_log():
            problems += _check_tokenizer(llm, meta, ref, row)
            row.update(agreement.compare(ref.scorer, agreement.gguf_scorer(llm), ref.convs, "all"))
            click.echo(f"  KL {row['kl']:.3g}, top-1 {row['top1_percent']:.1f} %, perplexity {row['perplexity']:.3f}")
            if row["kl"] > cfg.verify.f16_max_kl and export.kind and export.kind.unquantized:
                problems.append(f"{row['type']} KL divergence {row['kl']:.3g} to the {ref.label} model exceeds "
                                f"verify.f16_max_kl = {cfg.verify.f16_max_kl:g}: the export changed the model.")
            if ref.answered and meta["chat_template"]:
                answers = agreement.gguf_answers(llm, meta, [prompt_and_answer(r)[0] for r in ref.answered],
                                                 cfg.eval.max_tokens)
                row["metric"] = _score(answers, ref)
    except PipelineError as e:  # a template that does not render, logits of another vocabulary
        problems.append(str(e))
    finally:
        llm.close()
    if export.lora and row["kl"] is not None:
        problems += _check_lora_carries(export, ref, cfg, row)
    return row, problems


def _check_lora_carries(export: Export, ref: Reference, cfg, row: dict) -> list[str]:
    """The pair must be much closer to the trained model than its base GGUF alone: a LoRA GGUF of
    another adapter (or none of this one's change) would leave it where the base is. The base alone
    is measured on the first LORA_CHECK_ROWS compared rows: the verdict is a factor (MAX_KL_RATIO;
    the demo's pairs sit at 0.3 % of it and below), not a figure of the report's precision."""
    convs = ref.convs[:LORA_CHECK_ROWS]
    llm = llamacpp.open_gguf(export.path, GGUF_CTX, cfg.seed, logits_all=False)
    try:
        with llamacpp.captured_log():
            alone = agreement.compare(ref.scorer, agreement.gguf_scorer(llm), convs, "all")["kl"]
    finally:
        llm.close()
    row["kl_base_alone"], row["kl_base_alone_rows"] = alone, len(convs)
    click.echo(f"  base alone ({len(convs)} rows): KL {alone:.3g} (the LoRA GGUF closes {1 - row['kl'] / alone:.1%} "
               "of it)" if alone > 0 else f"  base alone ({len(convs)} rows): KL 0")
    if alone > 0 and row["kl"] > MAX_KL_RATIO * alone:
        return [f"with {export.lora.name} its KL {row['kl']:.3g} to the trained model is {row['kl'] / alone:.0%} of "
                f"the base GGUF's alone ({alone:.3g}): the LoRA GGUF does not carry this run's adapter. Run "
                "`make gguf` (or `mlx-pipeline gguf`) again to re-export it."]
    return []


def _check_tokenizer(llm, meta: dict, ref: Reference, row: dict) -> list[str]:
    """The GGUF's chat template must be the trained model's, and llama.cpp must tokenize the
    conversations it renders exactly as the HF tokenizer does (special tokens included)."""
    problems = []
    template = meta["chat_template"]
    row["chat_template_equal"] = template == ref.template
    if not row["chat_template_equal"]:
        problems.append("its chat template differs from the trained model's "
                        f"({_first_difference(template, ref.template)}).")
    mismatch = None
    for i, r in enumerate(ref.compared if template else []):
        text = render_chat(template, agreement.full_conversation(r), meta["special_tokens"])
        mine = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        theirs = ref.tokenizer.encode(text, add_special_tokens=False)
        if mine != theirs:
            mismatch = f"test row {i}: " + _first_difference(mine, theirs, "token")
            break
    row["tokenizer_equal"] = bool(template) and mismatch is None
    if mismatch:
        problems.append(f"llama.cpp tokenizes differently from the trained model's tokenizer ({mismatch}).")
    return problems


def _score(answers: list[str], ref: Reference) -> dict:
    return score_answers(answers, [prompt_and_answer(r)[1] for r in ref.answered])


def _template_str(t) -> str | None:
    return t.get("default") if isinstance(t, dict) else t


def _first_difference(a, b, unit: str = "character") -> str:
    if a is None or b is None:
        return "the GGUF has none" if a is None else "the trained model has none"
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    j = max(0, i - (12 if isinstance(a, str) else 2))  # a little context before it
    if isinstance(a, str):
        return f"first difference at {unit} {i}: {a[j:i + 24]!r} vs {b[j:i + 24]!r}"
    return f"first difference at {unit} {i}: {a[j:i + 4]} vs {b[j:i + 4]}"


def _check_chain(fused: dict, hf: dict, gguf: dict) -> None:
    """The GGUFs must come from the current fused model, or verify would measure the wrong files."""
    if not is_current(hf.get("inputs", {}).get("fused", {}).get("content_hash"), fused) or not is_current(
        gguf.get("inputs", {}).get("hf_content_hash"), hf
    ):
        raise PipelineError(
            "The GGUF files were not made from the current fused model (fused/ changed after hf/ or gguf/ "
            "was written). Run `make gguf` (or `mlx-pipeline gguf`) to re-export, then verify."
        )


def _check_adapter(choice: AdapterChoice, fused: dict, gguf: dict, trained: bool) -> None:
    """The GGUFs must come from the adapter the config chooses (ADAPTER / --adapter: best or last), or
    verify would vouch for another fine-tune than the one asked for: fused/ (07 records its adapter)
    and, when a base + LoRA pair is measured, the LoRA GGUF (09 records its source's sha256)."""
    now = sha256_file(choice.file) if choice.file.is_file() else None
    lora = (gguf.get("outputs") or {}).get("adapter_gguf") or {}
    made = [("fused/ (so every GGUF made from it)", fused.get("adapter") or {})]
    if trained:
        made.append((Path(str(lora.get("adapter_gguf", "the LoRA GGUF"))).name,
                     lora.get("adapter") or {"sha256": lora.get("adapter_source_sha256"), "adapter": "last"}))
    for what, record in made:
        if record.get("sha256") and record["sha256"] != now:
            kind = record.get("adapter", "best")
            raise PipelineError(
                f"{what} was made from the {adapter_words(record)} adapter, but the config chooses "
                f"{choice.describe().removeprefix('adapter: ')}. Export the chosen one (`make gguf "
                f"ADAPTER={choice.kind}` re-fuses and re-exports), or verify what was made: --adapter {kind} "
                f"(ADAPTER={kind}).")


def _fusion_note(paths: RunPaths, mlx_row: dict, fused_manifest: dict | None = None) -> list[str]:
    """Compare the fused model's task metric with base + adapter from 05 eval: verify measures the
    GGUFs against the fused model, so a fine-tune lost at fusion would otherwise pass unnoticed.
    Not when 05 and 07 used different adapters (best / last): those numbers do not compare."""
    results = paths.eval / "results.json"
    metric = mlx_row.get("metric")
    if not results.is_file() or not metric:
        return []
    fused_sha = ((fused_manifest or {}).get("adapter") or {}).get("sha256")
    try:
        eval_sha = (json.loads((paths.eval / MANIFEST).read_text()).get("inputs") or {}).get("adapter_sha256")
    except (OSError, ValueError, AttributeError):
        eval_sha = None
    if fused_sha and eval_sha and fused_sha != eval_sha:
        return []
    adapter = json.loads(results.read_text()).get("adapter", {}).get("metric", {})
    primary = metric.get("primary")
    if primary not in adapter:
        return []
    lost = adapter[primary] - metric[primary]
    if lost <= 5:
        return []
    return [f"warning: the fused model scores {metric[primary]:.1f}% {primary} but base + adapter scored "
            f"{adapter[primary]:.1f}% in 05 eval: the fine-tune was lost at fusion (re-quantization rounds a small "
            "adapter away). Fuse with --de-quantize (DEQUANTIZE=1) and re-export."]


def _mlx_type(path: Path) -> str:
    q = json.loads((path / "config.json").read_text()).get("quantization")
    return f"MLX {q['bits']}-bit" if isinstance(q, dict) and "bits" in q else "MLX"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def imatrix_notes(rows: list[dict], primary: str | None) -> list[str]:
    """What the importance matrix changed: each <TYPE>-imatrix file against the plain <TYPE> one."""
    by_key = {r.get("key"): r for r in rows}
    notes = []
    for r in rows:
        plain = by_key.get(r.get("key", "").removesuffix("-IMATRIX"))
        if r.get("kind") != gguf_kinds.IMATRIX.name or not plain or r["kl"] is None or plain["kl"] is None:
            continue
        change = (r["kl"] - plain["kl"]) / plain["kl"] * 100 if plain["kl"] else 0.0
        note = (f"imatrix: {plain['file']} KL {plain['kl']:.3g} -> {r['kl']:.3g} with the importance matrix "
                f"({change:+.0f} %)")
        if primary and "metric" in r and "metric" in plain:
            note += f", {primary} {plain['metric'][primary]:.1f} -> {r['metric'][primary]:.1f} %"
        notes.append(note + ".")
    return notes


def native_notes(gguf_manifest: dict) -> list[str]:
    """The native GGUF is measured against the trained model like every file; what it holds is its
    own MLX source's values, so its distance is the --no-dequantize fuse's, reported here."""
    native = gguf_manifest.get("native")
    if not native or not native.get("source"):
        return []
    source = Path(native["source"])
    if native.get("skipped"):
        return [f"native: no GGUF of {source.name}/ was exported (gguf.native): {native['skipped']}"]
    name = next((f["file"] for f in gguf_manifest["outputs"]["files"].values()
                 if f.get("kind") == gguf_kinds.NATIVE_FUSE.name), "native")
    note = (f"native: {name} holds the MLX weights of {source.name}/ (max |GGUF - MLX| "
            f"{native['max_abs_diff']:.2g}); its KL above is that --no-dequantize fuse's distance to the trained model")
    if (source / MANIFEST).is_file():
        e2e = (read_manifest(source, "fuse", verify=False).get("survival") or {}).get("end_to_end") or {}
        if e2e.get("ratio") is not None:
            note += f": KL(trained || {source.name}) is {e2e['ratio']:.0%} of KL(trained || base)"
            if e2e["ratio"] > MAX_KL_RATIO:
                note += " (re-quantizing W + dW rounded most of the adapter away; see `survival` in its manifest)"
    return [note + "."]


def format_table(rows: list[dict], primary: str | None) -> str:
    head = "| file | made by | type | size | KL(MLX‖GGUF) | top-1 % | perplexity |" + (f" {primary} % |" if primary
                                                                                       else "")
    lines = [head, "|---|---|---|---|---|---|---|" + ("---|" if primary else "")]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        line = (f"| {r['file']} | {r.get('path', '')} | {r['type']} | {human_size(r['size_bytes'])} | "
                f"{fmt(r['kl'], '.3g')} | {fmt(r['top1_percent'], '.1f')} | {fmt(r.get('perplexity'), '.3f')} |")
        if primary:
            line += f" {fmt(r.get('metric', {}).get(primary), '.1f')} |"
        lines.append(line)
    return "\n".join(lines)


def _failures_md(failures: list[str]) -> str:
    if not failures:
        return "\n**PASSED**\n"
    return "\n**FAILED**\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
