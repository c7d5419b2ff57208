"""How much of an adapter survives fusing: per layer (weights) and end to end (next-token KL).

Per adapted layer, with W the weights the adapter was fused into (the quantized base's values,
or the original full-precision ones for --rebase), dW the adapter's exact change (the LoRA
layer's own fuse, in float32) and W_fused the stored fused weights (after re-quantization or
rounding to the output dtype):

- survival = ||W_fused - W|| / ||dW||      (~1: the change is there; ~0: it vanished)
- error    = ||W_fused - (W + dW)|| / ||dW|| (~0: exact; >= 1: rounding noise as large as dW)

Survival alone can look fine when re-quantization replaces dW by noise of the same size; the
error says how much of it is dW. Linear layers are rated on sampled rows (SAMPLED_ROWS), computed
with the fused weights as 07 writes them. End to end, on a few validation rows in float32,
predicting the answer tokens: KL(base + adapter || fused) against KL(base + adapter || base), where
base + adapter is what was trained (the training base with the adapter loaded) and base is what the
adapter was fused into. ratio = the first / the second: ~0 the fine-tune survived, ~1 it is gone.
The models run streamed (pipeline/modeling.py: one block's weights in memory at a time), and the
rows are as many as E2E_BUDGET allows for the model's size (all 4 for SmolLM2-135M, 1 at 1 B+).
Above E2E_ALWAYS_PARAMETERS it is skipped where it cannot change the verdict, and for re-quantized
fuses without --strict (verdict unknown: `end_to_end_needed`).
"""

from __future__ import annotations

import math
from pathlib import Path

from . import agreement

# The fused model must be much closer to base + adapter than the base is, or the fine-tune was lost.
# Measured on the demo: the --no-dequantize fuse kept KL ratio 0.48 yet scored 0 % JSON match
# (98.3 % unfused): half of the KL gap already loses the task, so 0.5 was too lenient.
MAX_KL_RATIO = 0.25
E2E_ROWS = 4
# The end-to-end check runs 3 models over its rows: rows' tokens x parameters kept within this many
# (SmolLM2-135M: its 4 rows; a 1 B model: 1 row, ~85 tokens; 8 B: 1 row).
E2E_BUDGET = 1e11
# Models this small always get the end-to-end check; larger ones when a layer's error exceeds EXACT_ERROR.
E2E_ALWAYS_PARAMETERS = 500_000_000
EXACT_ERROR = 0.1
WORST_LAYERS = 5
SAMPLED_ROWS = 256  # per fused linear layer, for the per-layer figures
SPAN = "answer"  # the fine-tune shows in the answers; the prompt tokens would dilute it

BETTER_OPTIONS = (
    "better options: `--rebase` (add the adapter to the original full-precision base; the GGUF step "
    "quantizes once), `--de-quantize` (keep W + dW exactly, in full precision), or ship the adapter itself "
    "as a LoRA GGUF (gguf.adapter_gguf) next to the 4-bit training base as a native GGUF (Q4_1): that pair "
    "is the trained model"
)


def layer_stats(name: str, figures: list[float]) -> dict:
    """One layer's survival and error from `layer_figures` / `block_figures` (evaluated; blocks summed)."""
    dn, mn, en, rqn = (math.sqrt(max(x, 0.0)) for x in figures[:4])
    if dn == 0:
        return {"layer": name, "delta_norm": 0.0, "survival": None, "error": None}
    out = {"layer": name, "delta_norm": dn, "survival": mn / dn, "error": en / dn}
    if figures[4] > 0:  # the re-quantized layer before the final cast (p07's delta error)
        out["requantized_error"] = rqn / dn
    return out


def summarize_layers(stats: list[dict]) -> dict:
    rated = [s for s in stats if s["survival"] is not None]
    if not rated:
        return {"layers": len(stats), "rated_layers": 0}
    worst = sorted(rated, key=lambda s: -s["error"])[:WORST_LAYERS]
    total_delta = math.sqrt(sum(s["delta_norm"] ** 2 for s in rated))
    total_err = math.sqrt(sum((s["error"] * s["delta_norm"]) ** 2 for s in rated))
    return {
        "layers": len(stats),
        "rated_layers": len(rated),
        "mean_survival": round(sum(s["survival"] for s in rated) / len(rated), 4),
        "min_survival": round(min(s["survival"] for s in rated), 4),
        "mean_error": round(sum(s["error"] for s in rated) / len(rated), 4),
        "max_error": round(max(s["error"] for s in rated), 4),
        # ||sum of errors|| / ||sum of deltas|| over all layers: the old `delta_error` figure.
        "overall_error": round(total_err / total_delta, 4) if total_delta > 0 else None,
        "worst_layers": [{"layer": s["layer"], "survival": round(s["survival"], 4), "error": round(s["error"], 4)}
                         for s in worst],
    }


def layer_figures(lora, fused, requantized: dict | None = None):
    """Lazy squared norms of one fused layer, in float32 (`layer_stats` reads them):
    [||dW||², ||W_fused - W||², ||W_fused - (W + dW)||², ||requantized - (W + dW)||², 1 if that
    last one was measured else 0]. Squared norms, so that blocks of rows add up.

    `lora` is the LoRA/DoRA layer that was fused (its inner layer holds W, the weights it was
    fused into); `fused` the layer as stored (after re-quantization / the final cast);
    `requantized` its arrays before the final cast (`modeling.weight_arrays`). Lazy, so that they
    are computed together with the fused weights, while W is in memory anyway.
    Linear layers are rated on every k-th output row (at most SAMPLED_ROWS rows): fusion works
    row by row, so the sampled rows estimate the norms' ratios at 1/k of the cost.
    """
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    from .modeling import dense_rows, weight_arrays

    if isinstance(lora, (LoRALinear, DoRALinear)):
        n = lora.linear.weight.shape[0]
        return block_figures(lora, slice(0, n), weight_arrays(fused), requantized)
    # embeddings, experts: every row, through the layer's own fuse
    inner = lora["linear"] if "linear" in lora else lora["embedding"]
    w0 = dense_rows(weight_arrays(inner), slice(None))
    adapted = lora.fuse(dequantize=True).weight.astype(mx.float32)
    return _figures(w0, adapted, dense_rows(weight_arrays(fused), slice(None)),
                    None if requantized is None else dense_rows(requantized, slice(None)))


def block_figures(lora, rows: slice, fused: dict, requantized: dict | None = None):
    """`layer_figures` of a LoRA/DoRA linear layer's output rows `rows` (start:stop), whose fused
    arrays as stored (`fused`) and before the final cast (`requantized`) hold exactly those rows: the
    rows sampled in it are those `layer_figures` samples in the whole layer, so the blocks' figures
    add up to the layer's."""
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear

    from .modeling import dense_rows, weight_arrays

    n = lora.linear.weight.shape[0]
    stride = max(1, n // SAMPLED_ROWS)
    first = -rows.start % stride
    local, sampled = slice(first, None, stride), slice(rows.start + first, rows.stop, stride)
    w0 = dense_rows(weight_arrays(lora.linear), sampled)
    adapted = w0 + (lora.scale * lora.lora_b.T[sampled].astype(mx.float32)) @ lora.lora_a.T.astype(mx.float32)
    if isinstance(lora, DoRALinear):  # as its fuse(): rows rescaled to the learned magnitudes
        adapted = (lora.m[sampled].astype(mx.float32) / mx.linalg.norm(adapted, axis=1))[:, None] * adapted
    return _figures(w0, adapted, dense_rows(fused, local),
                    None if requantized is None else dense_rows(requantized, local))


def _figures(w0, adapted, stored, requantized):
    import mlx.core as mx

    exact, moved = adapted - w0, stored - w0
    parts = [(exact * exact).sum(), (moved * moved).sum(), ((moved - exact) ** 2).sum()]
    if requantized is not None:
        parts += [((requantized - adapted) ** 2).sum(), mx.array(1.0)]
    else:
        parts += [mx.array(0.0), mx.array(0.0)]
    return mx.stack(parts)


def end_to_end(train_base: Path, adapters: Path, fused: Path, fused_into: Path, valid: Path,
               parameters: int = 0, n_rows: int = E2E_ROWS) -> dict | None:
    """KL(trained || fused) and KL(trained || base) over the answer tokens of a few validation rows,
    float32 (pipeline/agreement.py, span "answer").

    trained = `train_base` + adapter (what training optimised); base = `fused_into` (what the
    adapter was added to: the training base, or the original base for --rebase). Each model is
    run once over all rows, streamed (pipeline/modeling.py: one block's weights in memory at a
    time); trained and base share that pass when the base is the training base and the adapter is
    plain LoRA. Rows are taken while rows' tokens x `parameters` stay within E2E_BUDGET (at least
    one). Returns None when there are no chat/completions validation rows.
    """
    from mlx_lm.utils import load_tokenizer

    rows = agreement.read_rows(valid, n_rows, required=False)
    if not rows:
        return None
    convs = _within_budget(agreement.conversations(load_tokenizer(Path(train_base)), rows), parameters)
    if Path(fused_into) == Path(train_base):
        trained, base = _trained_and_base(train_base, adapters, convs)
    else:
        trained, base = _scores(train_base, convs, adapters), _scores(fused_into, convs)
    to_base = agreement.compare(trained, base, convs, SPAN)
    del base
    to_fused = agreement.compare(trained, _scores(fused, convs), convs, SPAN)
    return {
        "rows": len(convs),
        "positions": to_fused["positions"],
        "kl_trained_vs_fused": to_fused["kl"],
        "kl_trained_vs_base": to_base["kl"],
        "ratio": (to_fused["kl"] / to_base["kl"]) if to_base["kl"] > 0 else None,
        "base": str(fused_into),
    }


def end_to_end_needed(layers: dict, parameters: int, requantized: bool = False, strict: bool = False) -> str | None:
    """None when the end-to-end check should run; else why it is skipped.

    It costs a float32 pass of the training base and one of the fused model, as long as the fuse
    itself (1.2 B on 2 CPU cores: ~8 s each). Models up to E2E_ALWAYS_PARAMETERS always get it.
    Above that it is skipped where it could not change the verdict: every fused layer within
    EXACT_ERROR of W + dW (a --de-quantize or --rebase fuse, only rounded to its dtype): then the
    fused model computes base + adapter up to that rounding (1.2 B synthetic Llama, max error 0.07:
    KL ratio 1.3e-7). A re-quantized fuse above that size runs it with `strict` only (otherwise the
    fuse would take ~2x `mlx_lm fuse`): the verdict is then unknown (`lost` gives None), and said so.
    Per-layer figures cannot stand in for it there: error 1.5 kept a 1.2 B model's fine-tune (KL
    ratio 0.009), error 2.7 lost SmolLM2's (KL ratio 0.42).
    """
    max_error = layers.get("max_error")
    if parameters <= E2E_ALWAYS_PARAMETERS or max_error is None:
        return None
    if max_error <= EXACT_ERROR:
        return (f"every fused layer is within {max_error:.3f} of W + dW (at most {EXACT_ERROR}: only rounded to its "
                f"dtype), and the model has {parameters / 1e9:.1f} B parameters, so the fused model computes base + "
                "adapter up to rounding; the end-to-end pass (as long as the fuse itself) was skipped")
    if not requantized or strict:
        return None
    return (f"NOT MEASURED: the model has {parameters / 1e9:.1f} B parameters (over {E2E_ALWAYS_PARAMETERS / 1e9:.1f} "
            "B), where a re-quantized fuse runs the end-to-end pass (about as long as the fuse itself) only with "
            "--strict. Per layer (sampled rows) re-quantization moved the weights "
            f"{layers.get('overall_error') or 0:.0%} of the adapter's own change away from W + dW; only the "
            "end-to-end pass tells whether the fine-tune "
            "survived that (fuse --strict measures it and refuses a lost one; --de-quantize or --rebase keep it "
            "exactly)")


def _within_budget(convs: list, parameters: int) -> list:
    taken, tokens = [], 0
    for c in convs:
        tokens += len(c.ids)
        if taken and tokens * parameters > E2E_BUDGET:
            break
        taken.append(c)
    return taken


def _scores(model_dir: Path, convs: list, adapters: Path | None = None, gate: bool = False):
    """A scorer (agreement.Scorer) holding the log-probabilities of one streamed pass over `convs`.
    `gate`: the rows are run twice, the second time with every LoRA layer's scale 0 (the base);
    returns (with adapter, without) then."""
    import numpy as np

    from .modeling import forward_streamed, load_streamed

    model = load_streamed(model_dir, adapters)
    rows = [c.ids for c in convs]
    if gate:
        _gate_adapters(model, len(convs))
        rows = rows + rows
    logits = forward_streamed(model, rows)
    del model
    out = []
    for half in range(2 if gate else 1):
        memo = {}
        for i, c in enumerate(convs):
            s = c.positions(SPAN)
            memo[id(c)] = agreement.log_softmax(np.array(logits[half * len(convs) + i, s.start:s.stop]))
        out.append(lambda conv, span, memo=memo: memo[id(conv)])
    return (out[0], out[1]) if gate else out[0]


def _trained_and_base(train_base: Path, adapters: Path, convs: list):
    """Both in one pass when every adapter layer is plain LoRA (its scale can be gated per row)."""
    import json

    kind = json.loads((Path(adapters) / "adapter_config.json").read_text()).get("fine_tune_type", "lora")
    if kind == "lora":
        return _scores(train_base, convs, adapters, gate=True)
    return _scores(train_base, convs, adapters), _scores(train_base, convs)


def _gate_adapters(model, n: int) -> None:
    """Rows [0, n) with the adapter, rows [n, 2n) without: each LoRA layer's scale becomes per row."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.scale = mx.array([float(m.scale)] * n + [0.0] * n, dtype=mx.float32).reshape(-1, 1, 1)


def lost(report: dict) -> bool | None:
    """Whether the end-to-end check found the fine-tune lost; None when it was needed but not run
    (a large re-quantized fuse without --strict, `end_to_end_needed`)."""
    e2e, max_error = report.get("end_to_end"), (report.get("layers") or {}).get("max_error") or 0
    if e2e is None and report.get("end_to_end_skipped") and max_error > EXACT_ERROR:
        return None
    e2e = e2e or {}
    return e2e.get("ratio") is not None and e2e["ratio"] > MAX_KL_RATIO


def summary_lines(report: dict) -> list[str]:
    lines = []
    layers = report.get("layers") or {}
    if layers.get("rated_layers"):
        worst = ", ".join(f"{w['layer']} ({w['error']:.2f})" for w in layers["worst_layers"][:3])
        lines.append(f"adapter survival over {layers['rated_layers']} fused layers: ||W_fused - W|| / ||dW|| "
                     f"mean {layers['mean_survival']:.3f} (min {layers['min_survival']:.3f}); "
                     f"error ||W_fused - (W + dW)|| / ||dW|| mean {layers['mean_error']:.3f} "
                     f"(max {layers['max_error']:.3f}; worst: {worst})")
    if report.get("end_to_end_skipped"):
        lines.append(f"end to end: {report['end_to_end_skipped']}")
    e2e = report.get("end_to_end")
    if e2e:
        ratio = "n/a" if e2e["ratio"] is None else f"{e2e['ratio']:.3f}"
        lines.append(f"end to end ({e2e['rows']} validation rows, {e2e['positions']} answer tokens, float32): "
                     f"KL(trained || fused) {e2e['kl_trained_vs_fused']:.4g} vs KL(trained || base) "
                     f"{e2e['kl_trained_vs_base']:.4g}: ratio {ratio} (0 = fine-tune kept, 1 = lost; "
                     f"warn above {MAX_KL_RATIO})")
    return lines


def lost_message(report: dict, dequantized: bool, rebased: bool) -> str:
    e2e = report["end_to_end"]
    how = "rebase" if rebased else ("--de-quantize" if dequantized else "--no-dequantize (re-quantized W + dW)")
    return (f"the fused model ({how}) is not much closer to base + adapter than the base is: "
            f"KL(trained || fused) {e2e['kl_trained_vs_fused']:.4g} is {e2e['ratio']:.0%} of "
            f"KL(trained || base) {e2e['kl_trained_vs_base']:.4g}; most of the fine-tune was lost at fusion. "
            + BETTER_OPTIONS + ".")
