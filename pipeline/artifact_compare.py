"""Tables for `mlx-pipeline inspect`: one artifact by category, or two side by side with one sentence
per large difference saying why (optimizer state, de-quantization, tied embeddings, LoRA only).
The numbers come from pipeline/artifact_sizes.py."""

from __future__ import annotations

from .artifact_sizes import CATEGORIES, LABELS, WEIGHT_CATEGORIES, Artifact, Category
from .fsio import human_size

LARGE = 0.01  # a difference is explained when it is at least 1 % of the larger artifact


def _n(x: int | None) -> str:
    return "-" if not x else f"{x:,}"


def _bits(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _signed(n: int, size: bool) -> str:
    if not n:
        return "0"
    return ("+" if n > 0 else "-") + (human_size(abs(n)) if size else f"{abs(n):,}")


def render_artifact(a: Artifact) -> str:
    rows = [("category", "parameters", "bytes", "stored as", "bits/weight", "trainable")]
    for k, c in a.categories.items():
        rows.append((LABELS[k], _n(c.params), human_size(c.bytes), c.dtype_text(),
                     "" if k in ("metadata", "optimizer") else _bits(c.bits_per_weight), c.trainable))
    share = a.total_bytes / a.file_bytes * 100 if a.file_bytes else 100.0
    rows.append(("total", _n(a.total_params), human_size(a.total_bytes), "", "", ""))
    out = [f"{a.path}: {a.description}", _table(rows),
           f"categories add up to {a.total_bytes:,} bytes = {share:.2f} % of the {a.file_bytes:,} bytes on disk "
           f"({len(a.files)} file{'s' if len(a.files) != 1 else ''})"]
    w = a.weights()
    if w.params:
        out.append(f"weights: {w.params:,} parameters at {w.bits_per_weight:.2f} bits per weight "
                   f"({w.dtype_text()})")
    if a.trainable_params():
        full = a.config.get("fine_tune_type") == "full"
        out.append(f"trainable: {a.trainable_params():,} parameters (" + ("full fine-tune: every weight in the file)"
                   if full else "the adapter's tensors; the base model's weights stay frozen)"))
    if a.moments[0]:
        out.append(f"optimizer state: {a.moments[0]:,} values (Adam's m and v: "
                   f"{a.moments[0] / max(a.trainable_params(), 1):.2f} per trainable parameter) "
                   f"+ {a.moments[1]} scalars (step counter, learning rate)")
    if a.metadata_files:
        top = ", ".join(f"{k} {human_size(v)}" for k, v in list(a.metadata_files.items())[:4])
        out.append(f"metadata: {top}")
    out += a.notes
    return "\n".join(out)


def differences(a: Artifact, b: Artifact) -> list[dict]:
    rows = []
    for k in CATEGORIES:
        ca, cb = a.categories.get(k, Category()), b.categories.get(k, Category())
        if ca.bytes or cb.bytes:
            rows.append({"category": k, "a_params": ca.params, "a_bytes": ca.bytes, "b_params": cb.params,
                         "b_bytes": cb.bytes, "delta_params": cb.params - ca.params,
                         "delta_bytes": cb.bytes - ca.bytes,
                         "a_bits_per_weight": ca.bits_per_weight, "b_bits_per_weight": cb.bits_per_weight})
    return rows


def render_comparison(a: Artifact, b: Artifact) -> str:
    rows = [("category", "A params", "A bytes", "B params", "B bytes", "delta bytes", "delta params")]
    for r in differences(a, b):
        rows.append((LABELS[r["category"]], _n(r["a_params"]), human_size(r["a_bytes"]), _n(r["b_params"]),
                     human_size(r["b_bytes"]), _signed(r["delta_bytes"], True), _signed(r["delta_params"], False)))
    rows.append(("total", _n(a.total_params), human_size(a.total_bytes), _n(b.total_params),
                 human_size(b.total_bytes), _signed(b.total_bytes - a.total_bytes, True),
                 _signed(b.total_params - a.total_params, False)))
    wa, wb = a.weights(), b.weights()
    if wa.params or wb.params:
        rows.append(("bits/weight", "", _bits(wa.bits_per_weight) or "-", "", _bits(wb.bits_per_weight) or "-", "",
                     ""))
    out = [f"A = {a.path}: {a.description}", f"B = {b.path}: {b.description}", _table(rows),
           f"categories add up to the bytes on disk: A {a.total_bytes:,} of {a.file_bytes:,}, "
           f"B {b.total_bytes:,} of {b.file_bytes:,}"]
    out += [f"{name}: {note}" for name, x in (("A", a), ("B", b)) for note in x.notes if note.startswith("not counted")]
    why = explain(a, b)
    if why:
        out += ["", "Why:"] + [f"- {s}" for s in why]
    return "\n".join(out)


def comparison_json(a: Artifact, b: Artifact) -> dict:
    return {"a": a.to_json(), "b": b.to_json(), "differences": differences(a, b), "explanations": explain(a, b)}


def explain(a: Artifact, b: Artifact) -> list[str]:
    """One sentence per large difference (>= LARGE of the larger artifact), saying why."""
    threshold = LARGE * max(a.total_bytes, b.total_bytes)
    large = {r["category"] for r in differences(a, b) if abs(r["delta_bytes"]) >= threshold}
    out: list[str] = []
    explained: set[str] = set()
    names = {id(a): "A", id(b): "B"}
    for s in (_optimizer, _lora_only, _lora_fused, _tied, _dequantized):
        sentence, covers = s(a, b, names)
        if sentence and covers & large:
            out.append(sentence)
            explained |= covers
    for k in CATEGORIES:
        if k in large and k not in explained:
            out.append(_generic(k, a, b))
    return out


def _cat(x: Artifact, k: str) -> Category:
    return x.categories.get(k, Category())


def _optimizer(a, b, names):
    with_, without = (a, b) if _cat(a, "optimizer").bytes > _cat(b, "optimizer").bytes else (b, a)
    opt = _cat(with_, "optimizer")
    if not opt.bytes:
        return "", set()
    trainable, (moments, scalars) = with_.trainable_params(), with_.moments
    per = f"2 x {trainable:,} = {moments:,} values" if moments == 2 * trainable else \
        f"{moments:,} values for {trainable:,} trainable parameters"
    same = " The trained weights are the same size in both." if _cat(a, "lora").bytes == _cat(b, "lora").bytes \
        else ""
    return (f"optimizer state: {names[id(with_)]} is {human_size(opt.bytes)} larger because it keeps the "
            f"optimizer state to resume training: Adam keeps two values (its moments m and v) per trainable "
            f"parameter, {per} in {opt.dtypes.most_common(1)[0][0]}, plus {scalars} scalars (step counter, "
            f"learning rate); "
            f"{names[id(without)]} holds only the trained weights.{same}"), {"optimizer"}


def _lora_only(a, b, names):
    for x, y in ((a, b), (b, a)):
        if _cat(x, "lora").params and not x.weights().params and y.weights().params:
            lora, w = _cat(x, "lora"), y.weights()
            return (f"LoRA only: {names[id(x)]} holds only the adapter's A/B matrices ({lora.params:,} parameters, "
                    f"{human_size(lora.bytes)}); the {w.params:,} base-model parameters ({human_size(w.bytes)}) are "
                    f"in {names[id(y)]} only: an adapter is applied on top of its base at load time, or fused "
                    f"into it by 07."), set(WEIGHT_CATEGORIES) | {"lora"}
    return "", set()


def _lora_fused(a, b, names):
    for x, y in ((a, b), (b, a)):
        if _cat(x, "lora").params and not _cat(y, "lora").params and x.weights().params and y.weights().params:
            lora = _cat(x, "lora")
            return (f"LoRA: {names[id(x)]} keeps the adapter's A/B matrices apart ({lora.params:,} parameters, "
                    f"{human_size(lora.bytes)}); {names[id(y)]} has none (07 fuse folds B x A into the base "
                    f"weights, which keep their shapes)."), {"lora"}
    return "", set()


def _tied(a, b, names):
    for x, y in ((a, b), (b, a)):
        if x.tied_embeddings and _cat(y, "head").params:
            head = _cat(y, "head")
            return (f"tied embeddings: {names[id(x)]} has no separate lm_head (tie_word_embeddings: the output "
                    f"layer reuses the embedding matrix); {names[id(y)]} stores one: {head.params:,} parameters, "
                    f"{human_size(head.bytes)}."), {"head"}
    return "", set()


def _dequantized(a, b, names):
    """Same weights at another precision: the bits per weight explain the bytes."""
    wa, wb = a.weights(), b.weights()
    if not (wa.params and wb.params) or abs(wa.params - wb.params) > 0.01 * max(wa.params, wb.params):
        return "", set()
    ba, bb = wa.bits_per_weight, wb.bits_per_weight
    if max(ba, bb) / min(ba, bb) < 1.3:
        return "", set()
    quantized = [_quantized(w) for w in (wa, wb)]
    what = ("de-quantization" if bb > ba and quantized[0] else "quantization" if bb < ba and quantized[1]
            else "precision")
    covers = {k for k in WEIGHT_CATEGORIES if _cat(a, k).params and _cat(a, k).params == _cat(b, k).params}
    return (f"{what}: bits per weight went from {ba:.2f} in A ({_precision(wa)}) to {bb:.2f} in B "
            f"({_precision(wb)}), so the same {wb.params:,} weight parameters take {human_size(wb.bytes)} "
            f"instead of {human_size(wa.bytes)} ({wb.bytes / wa.bytes:.2f}x)."), covers


def _quantized(w: Category) -> bool:
    """Stored mostly in a quantized type (MLX n-bit, GGUF Q*/IQ*), not a float type."""
    return w.dtypes.most_common(1)[0][0] not in ("F64", "F32", "F16", "BF16")


def _precision(w: Category) -> str:
    """The main storage type, with what a quantized weight's bits are made of."""
    main = w.dtypes.most_common(1)[0][0]
    if "-bit" in main:
        bits, group = int(main.split("-bit")[0]), main.rsplit("g", 1)[-1]
        return (f"{main}: {bits} bits per weight plus {w.bits_per_weight - bits:.2f} for the scale and bias "
                f"each group of {group} weights shares; norms stay unquantized")
    return main


def _generic(k: str, a: Artifact, b: Artifact) -> str:
    ca, cb = _cat(a, k), _cat(b, k)
    delta = cb.bytes - ca.bytes
    bigger = "B" if delta > 0 else "A"
    if k == "metadata":
        x = b if delta > 0 else a
        top = ", ".join(f"{n} {human_size(v)}" for n, v in list(x.metadata_files.items())[:3])
        return (f"metadata: {bigger} has {human_size(abs(delta))} more outside tensor data (headers, JSON, "
                f"tokenizer and other files: {top}).")
    if ca.params != cb.params:
        return (f"{LABELS[k]}: {bigger} has {abs(cb.params - ca.params):,} more parameters "
                f"({human_size(abs(delta))}): a different model size, architecture or set of tensors.")
    return (f"{LABELS[k]}: the same {ca.params:,} parameters stored as {ca.dtype_text()} in A and "
            f"{cb.dtype_text()} in B ({_bits(ca.bits_per_weight)} vs {_bits(cb.bits_per_weight)} bits per weight).")


def _table(rows: list[tuple]) -> str:
    """Left-aligned first and text columns, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    numeric = [i for i in range(len(rows[0])) if i and all(_numeric(str(r[i])) for r in rows[1:])]
    lines = []
    for r in rows:
        cells = [str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    return not s or s[0].isdigit() or s[0] in "+-"
