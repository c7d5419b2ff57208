"""10 Verify every GGUF against the MLX model it was made from, in llama.cpp itself.

For each models/<run>/gguf/*.gguf, on the test split:
- tokenizer and chat template: the GGUF's own chat template (from its metadata, rendered in a
  sandboxed Jinja environment) must equal the trained model's, and llama.cpp's tokenization of the
  rendered conversations must equal the Hugging Face tokenizer's;
- next-token fidelity on the same full-conversation tokens: mean KL(MLX || GGUF) over positions,
  top-1 agreement and each model's perplexity;
- the task metric (greedy answers scored by pipeline/metrics.py), for the GGUF and for MLX.
The MLX reference is models/<run>/fused/ in float32 (on CPU its quantized layers run dequantized,
which is exact). Verify FAILS, naming the file, when a GGUF does not load, its tokenizer or chat
template differs, or the unquantized (F16/BF16/F32) file's KL exceeds verify.f16_max_kl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from .. import llamacpp
from ..data.formats import prompt_and_answer
from ..errors import DataError, MissingInputError, PipelineError
from ..fsio import human_size, sha256_file, write_json, write_text
from ..manifest import MANIFEST, is_current, read_manifest, write_manifest
from ..metrics import score_answers
from ..paths import RunPaths
# Chat templates are untrusted input: compiled and rendered in pipeline/untrusted's sandbox, under
# time and size limits (`_jinja` is the compiled template, cached per text).
from ..untrusted import check_gguf
from ..untrusted.chat_template import compile_template as _jinja  # noqa: F401
from ..untrusted.chat_template import render_chat
from .common import done, start_phase

UNQUANTIZED = ("F32", "F16", "BF16")


@dataclass
class VerifyResult:
    path: Path
    rows: list[dict] = field(default_factory=list)  # one per GGUF, then the MLX reference
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Reference:
    """The trained model as verify sees it: its HF tokenizer and chat template, and MLX logits."""

    tokenizer: object  # transformers' tokenizer of the trained model
    template: str
    model: object  # mlx-lm model in float32
    mlx_tokenizer: object
    compared: list[dict]  # test rows compared token by token
    answered: list[dict]  # test rows answered for the task metric
    ids: list[list[int]]  # the full conversations of `compared`, tokenized by `tokenizer`

    def logprobs(self, ids: list[int]) -> np.ndarray:
        # Recomputed for every GGUF instead of cached: rows x tokens x vocab would not stay small.
        return _log_softmax(_mlx_logits(self.model, ids))


def verify_gguf(cfg) -> VerifyResult:
    started = start_phase(cfg, "10 verify GGUF", ["verify", "eval"])
    paths = RunPaths(cfg)
    out = paths.verify
    (out / MANIFEST).unlink(missing_ok=True)  # a failed verify must not leave an old pass behind
    _check_chain(read_manifest(paths.fused, "fuse"), read_manifest(paths.hf, "hf"), read_manifest(paths.gguf, "gguf"))
    llamacpp.check_runtime()
    files = sorted(paths.gguf.glob("*.gguf"), key=lambda p: (-p.stat().st_size, p.name))  # F16 first
    from ..adapter_gguf import adapter_gguf_path, compare_with_mlx, is_adapter_output, paired_base_path

    files = [p for p in files if not is_adapter_output(cfg, p)]  # base + LoRA is checked separately below
    if not files:
        raise MissingInputError(f"No .gguf files in {paths.gguf}. Run `make gguf` (or `mlx-pipeline gguf`) first.")

    ref = _reference(paths, cfg)
    click.echo(f"MLX reference: {paths.fused} (float32); {len(ref.compared)} test rows compared, "
               f"{len(ref.answered)} answered")
    mlx_row = {"file": f"{paths.fused.name}/ (MLX)", "type": _mlx_type(paths.fused),
               "size_bytes": _dir_size(paths.fused), "kl": None, "top1_percent": None,
               "perplexity": _perplexity([(ref.logprobs(ids), ids) for ids in ref.ids])}
    if ref.answered:
        from .p05_evaluate import generate_answers

        prompts = [prompt_and_answer(r)[0] for r in ref.answered]
        mlx_row["metric"] = _score(generate_answers(ref.model, ref.mlx_tokenizer, prompts, cfg.eval.max_tokens), ref)

    notes = _fusion_note(paths, mlx_row)
    rows, failures = [], []
    for path in files:
        click.echo(f"\n{path.name}:")
        row, problems = _measure(path, ref, cfg)
        rows.append(row)
        failures += [f"{path.name}: {p}" for p in problems]
        for p in problems:
            click.secho(f"  FAIL {p}", fg="red")
    adapter_report = None
    if adapter_gguf_path(cfg).is_file() and paired_base_path(cfg).is_file():
        base_gguf, lora = paired_base_path(cfg), adapter_gguf_path(cfg)
        click.echo(f"\n{base_gguf.name} + {lora.name} vs MLX train base + adapter:")
        adapter_report = compare_with_mlx(cfg, max_rows=cfg.verify.max_rows, max_samples=cfg.verify.max_samples)
        a, b = adapter_report["gguf_base_lora"], adapter_report["gguf_base_alone"]
        click.echo(f"  KL {a['kl']:.3g} (base alone {b['kl']:.3g}), top-1 {a['top1_percent']:.1f} %")
        rows.append({"file": f"{base_gguf.name} + {lora.name}", "type": "F16 + LoRA",
                     "size_bytes": base_gguf.stat().st_size + lora.stat().st_size, "perplexity": None, **a})
        if a["kl"] > cfg.verify.f16_max_kl:
            failures.append(f"{lora.name}: KL {a['kl']:.3g} to MLX base + adapter exceeds "
                            f"verify.f16_max_kl = {cfg.verify.f16_max_kl:g}.")
    rows.append(mlx_row)
    fused_manifest = read_manifest(paths.fused, "fuse")
    for r in rows:
        r["path"] = export_path(r["file"], fused_manifest)
    notes += imatrix_notes(rows, primary=mlx_row.get("metric", {}).get("primary"))
    notes += native_notes(read_manifest(paths.gguf, "gguf"))

    primary = mlx_row.get("metric", {}).get("primary")
    report = {"rows_compared": len(ref.compared), "rows_answered": len(ref.answered), "primary_metric": primary,
              "f16_max_kl": cfg.verify.f16_max_kl, "passed": not failures, "failures": failures, "models": rows,
              "notes": notes, "adapter_gguf": adapter_report}
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
    write_manifest(out, "10_verify_gguf", cfg, started,
                   inputs={"gguf": {p.name: sha256_file(p) for p in files}, "fused": str(paths.fused),
                           "test_sha256": sha256_file(paths.data / "test.jsonl")},
                   outputs={"report": str(out / "report.json"), "table": str(out / "report.md")})
    done(f"verify passed: {len(files)} GGUF file(s) match the MLX model; report in {out / 'report.md'}")
    return VerifyResult(out, rows, failures)


def _reference(paths: RunPaths, cfg) -> Reference:
    from transformers import AutoTokenizer

    from ..modeling import load_model

    rows = _chat_rows(paths.data / "test.jsonl")
    tok_dir = paths.fused if (paths.fused / "tokenizer_config.json").is_file() else paths.hf
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    template = _template_str(tokenizer.chat_template)
    if not template:
        raise PipelineError(f"{tok_dir} has no chat template: verify compares chat conversations.")
    compared = rows[: cfg.verify.max_rows]
    ids = [tokenizer.apply_chat_template(_full(r), tokenize=True, return_dict=False) for r in compared]
    model, mlx_tokenizer, _ = load_model(paths.fused, "float32")
    return Reference(tokenizer, template, model, mlx_tokenizer, compared, rows[: cfg.verify.max_samples], ids)


def _measure(path: Path, ref: Reference, cfg) -> tuple[dict, list[str]]:
    """Load one GGUF in llama.cpp and measure it. Problems are returned, not raised, so that every
    file gets reported."""
    row = {"file": path.name, "type": "?", "size_bytes": path.stat().st_size, "kl": None,
           "top1_percent": None, "perplexity": None}
    try:
        llm = load_gguf(path, max(len(ids) for ids in ref.ids) + cfg.eval.max_tokens + 16, cfg.seed)
    except PipelineError as e:
        return row, [str(e)]
    meta = gguf_metadata(llm)
    row["type"] = meta["type"] + (" (native)" if path.name.endswith("-native.gguf") else "")
    problems: list[str] = []
    try:
        with llamacpp.captured_log():
            problems += _check_tokenizer(llm, meta, ref, row)
            problems += _compare_logits(llm, ref, row)
            if row["kl"] is not None and row["type"] in UNQUANTIZED and row["kl"] > cfg.verify.f16_max_kl:
                problems.append(f"{row['type']} KL divergence {row['kl']:.3g} to the MLX model exceeds "
                                f"verify.f16_max_kl = {cfg.verify.f16_max_kl:g}: the export changed the model.")
            if ref.answered and meta["chat_template"]:
                answers = [_greedy(llm, render_chat(meta["chat_template"], prompt_and_answer(r)[0],
                                                    meta["special_tokens"], True), cfg.eval.max_tokens)
                           for r in ref.answered]
                row["metric"] = _score(answers, ref)
    except PipelineError as e:  # a template that does not render
        problems.append(str(e))
    finally:
        llm.close()
    return row, problems


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
        text = render_chat(template, _full(r), meta["special_tokens"])
        mine = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        theirs = ref.tokenizer.encode(text, add_special_tokens=False)
        if mine != theirs:
            mismatch = f"test row {i}: " + _first_difference(mine, theirs, "token")
            break
    row["tokenizer_equal"] = bool(template) and mismatch is None
    if mismatch:
        problems.append(f"llama.cpp tokenizes differently from the trained model's tokenizer ({mismatch}).")
    return problems


def _compare_logits(llm, ref: Reference, row: dict) -> list[str]:
    """Mean KL(MLX || GGUF) over every position of the reference token sequences, top-1 agreement
    and the GGUF's perplexity on the same tokens."""
    kls, agree, scored = [], [], []
    for ids in ref.ids:
        p, q = ref.logprobs(ids), _log_softmax(_gguf_logits(llm, ids))
        if p.shape != q.shape:
            return [f"its logits have {q.shape[-1]} entries per token, the MLX model's {p.shape[-1]}."]
        kls.append(np.sum(np.exp(p) * (p - q), axis=-1))
        agree.append(p.argmax(-1) == q.argmax(-1))
        scored.append((q, ids))
    row["kl"] = float(np.concatenate(kls).mean())
    row["top1_percent"] = round(100.0 * float(np.concatenate(agree).mean()), 2)
    row["perplexity"] = _perplexity(scored)
    click.echo(f"  KL {row['kl']:.3g}, top-1 {row['top1_percent']:.1f} %, perplexity {row['perplexity']:.3f}")
    return []


def _score(answers: list[str], ref: Reference) -> dict:
    return score_answers(answers, [prompt_and_answer(r)[1] for r in ref.answered])


def gguf_metadata(llm) -> dict:
    """Type, chat template and special-token strings, as llama.cpp read them from the GGUF."""
    import llama_cpp
    from gguf import LlamaFileType

    meta = llm.metadata
    try:
        type_name = LlamaFileType(int(meta.get("general.file_type", -1))).name
        type_name = type_name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        type_name = meta.get("general.file_type", "?")
    vocab = llm._model.vocab
    special = {}
    for name, fn in (("bos_token", llama_cpp.llama_vocab_bos), ("eos_token", llama_cpp.llama_vocab_eos),
                     ("pad_token", llama_cpp.llama_vocab_pad)):
        if (idx := fn(vocab)) >= 0:
            special[name] = llm._model.token_get_text(idx)
    return {"type": type_name, "chat_template": meta.get("tokenizer.chat_template"), "special_tokens": special}


def load_gguf(path: Path, n_ctx: int, seed: int):
    """llama.cpp's runtime on a GGUF, every position's logits kept; a failure names the file's problem."""
    import llama_cpp

    try:  # every count and offset checked before llama.cpp's reader sees the file
        check_gguf(path)
    except PipelineError as e:
        raise PipelineError(f"is not a valid GGUF, not loaded: {e}") from None
    with llamacpp.captured_log() as log:
        try:
            return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, seed=seed)
        except (ValueError, RuntimeError, OSError) as e:
            raise PipelineError(f"does not load in llama.cpp ({e}):\n{llamacpp.log_tail(log, 6)}") from None



def _greedy(llm, prompt: str, max_tokens: int) -> str:
    """Greedy answer from llama.cpp: argmax of its own logits, stopping at an end-of-generation token."""
    import llama_cpp

    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or llm.n_tokens >= llm.n_ctx():
            break
        out.append(tok)
        llm.eval([tok])
    return llm.detokenize(out).decode("utf-8", "replace").strip()


def _gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _mlx_logits(model, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return np.array(logits)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _perplexity(scored: list[tuple[np.ndarray, list[int]]]) -> float:
    """exp(mean next-token negative log-likelihood) of each sequence's own tokens."""
    nll = np.concatenate([-logp[np.arange(len(ids) - 1), ids[1:]] for logp, ids in scored])
    return round(float(math.exp(min(nll.mean(), 50))), 4)


def _chat_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise MissingInputError(f"{path} not found. Run `make data` (or `mlx-pipeline data`) first.")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "messages" in r or "prompt" in r]
    if not rows:
        raise DataError(f"{path} has no chat or completions rows: verify compares chat conversations.")
    return rows


def _full(row: dict) -> list[dict]:
    messages, answer = prompt_and_answer(row)
    return messages + [{"role": "assistant", "content": answer}]


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


def _fusion_note(paths: RunPaths, mlx_row: dict) -> list[str]:
    """Compare the fused model's task metric with base + adapter from 05 eval: verify measures the
    GGUFs against the fused model, so a fine-tune lost at fusion would otherwise pass unnoticed."""
    results = paths.eval / "results.json"
    metric = mlx_row.get("metric")
    if not results.is_file() or not metric:
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


def export_path(file: str, fused_manifest: dict) -> str:
    """How a verified file was made from the trained adapter, for the side-by-side table."""
    if file.endswith("(MLX)"):
        return "MLX fused (reference)"
    if " + " in file:
        return "LoRA GGUF on the de-quantized training base"
    if file.endswith("-native.gguf"):
        return "fuse --no-dequantize, MLX blocks transcoded (no 2nd quantization)"
    dequantized = fused_manifest.get("dequantized")
    fuse = ("fuse --rebase" if fused_manifest.get("rebased") else "fuse --de-quantize" if dequantized
            else "fuse --no-dequantize" if dequantized is False else "fused/")
    return fuse + (" + imatrix" if file.endswith("-imatrix.gguf") else "")


def imatrix_notes(rows: list[dict], primary: str | None) -> list[str]:
    """What the importance matrix changed: each <TYPE>-imatrix file against the plain <TYPE> one."""
    by_file = {r["file"]: r for r in rows}
    notes = []
    for r in rows:
        plain = by_file.get(r["file"].replace("-imatrix.gguf", ".gguf"))
        if not r["file"].endswith("-imatrix.gguf") or not plain or r["kl"] is None or plain["kl"] is None:
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
    from ..survival import MAX_KL_RATIO

    source = Path(native["source"])
    name = next((f["file"] for t, f in gguf_manifest["outputs"]["files"].items() if t.endswith("-native")), "native")
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
    head = "| file | made by | type | size | KL(MLX‖GGUF) | top-1 % | perplexity |" + (f" {primary} % |" if primary else "")
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
