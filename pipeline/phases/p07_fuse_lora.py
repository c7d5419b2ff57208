"""07 Fuse the trained adapter into its base: one MLX model folder that mlx-lm loads on its own.

`--no-dequantize` (default) keeps the base's quantization: each adapted layer is dequantized,
W + scale * B A is added and the sum re-quantized with the same bits and group size (the LoRA
layer's own `fuse()`, as in mlx-lm's fuse). The model stays the size of the quantized base, but
re-quantization rounds the delta onto the quantization grid and can bury a small adapter in
rounding noise (mlx-lm issues #1172, #654): the phase measures that error and warns.
`--de-quantize` writes every weight dense in `fuse.dtype`: about parameters x 2 bytes in bf16.
`--rebase` adds a QLoRA adapter (trained on base-quantized/) to the ORIGINAL full-precision weights
of base/ (the folder the quantized base was made from, checked by content hash) and writes them
dense in `fuse.dtype`; the GGUF step then quantizes once instead of twice.

Every fuse reports how much of the adapter survived (pipeline/survival.py): per layer, and end to
end on a few validation rows. When the fused model is not much closer to base + adapter than the
base is, it warns (`--strict`: fails and writes nothing). Above 0.5 B parameters a re-quantized
fuse measures end to end only with `--strict` (survival.end_to_end_needed: the manifest then
records the verdict as unknown, `lost: null`, and why).

Memory and time: the base is loaded lazily and the fused model written module by module
(modeling.save_model_streamed), plain LoRA layers (and, de-quantized, the other quantized layers)
in blocks of rows of a few MB (`fused_rows`: 2-3x faster on CPU than whole layers), each layer's
survival figures computed with it; the end-to-end check runs each model streamed, one block at a
time. The peak is about the process plus a few blocks, not the model (1.2 B Llama: 0.54 GB for a
2.35 GB --de-quantize output; 0.56 GB for a 0.66 GB --no-dequantize one). A machine without the
memory `check_memory` estimates is refused before anything is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import MissingInputError, PipelineError
from ..fsio import atomic_path, dir_size, hash_model_dir, human_size
from ..hf_export import TOKENIZER_FILES, copy_tokenizer_files  # noqa: F401 (tests name them here)
from ..manifest import MANIFEST, read_adapter_manifest, read_manifest, write_manifest
from ..modeling import check_weight_files, weight_arrays
from ..paths import AdapterChoice, GivenPaths, RunPaths, check_given_output, require_folder
from ..survival import (
    end_to_end,
    end_to_end_needed,
    layer_figures,
    layer_stats,
    lost,
    lost_message,
    summarize_layers,
    summary_lines,
)
from ..untrusted.safetensors_header import check_safetensors
from .common import done, start_phase

# Warn when the re-quantization error exceeds this share of the adapter's own weight change.
MAX_DELTA_ERROR = 0.5


@dataclass
class FuseResult:
    path: Path
    dequantized: bool
    fused_layers: int
    parameters: int
    sizes: dict  # bytes of safetensors: base, adapter, fused
    delta_error: float | None  # |re-quantized delta - exact delta| / |exact delta|
    rebased: bool = False
    survival: dict | None = None  # pipeline.survival report (per layer, end to end)


def fuse(cfg, paths: RunPaths | None = None) -> FuseResult:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_model, save_config

    from ..modeling import cast_floats, count_parameters

    given = isinstance(paths, GivenPaths)  # the guides' form: --base-model --adapter-path --output-dir
    started = start_phase(cfg, "07 fuse", ["fuse"], given=paths.given if given else None)
    paths = paths or RunPaths(cfg)
    rebase = bool(getattr(cfg.fuse, "rebase", False))
    strict = bool(getattr(cfg.fuse, "strict", False))
    if given:
        require_folder(paths.adapters, "--adapter-path")
        check_given_output(paths.fused, {"the base model": paths.train_base, "the adapter": paths.adapters},
                           "07_fuse_lora")
        if rebase:
            raise PipelineError("--rebase finds the original full-precision base through a run's manifests; with "
                                "--base-model, fuse into that base directly (--de-quantize for full precision).")
    choice = paths.adapter_choice
    adapter_cfg = read_adapter(choice, given)
    click.echo(choice.describe())
    adapters = choice.folder
    if rebase:
        base, base_hash, trained_on = check_rebase(cfg, paths, adapter_cfg)
    else:
        base = paths.train_base
        known_hash = None
        if given and not (base / MANIFEST).is_file():
            check_weight_files(base)  # a folder from elsewhere: headers validated before MLX reads it
        else:  # its content hash, verified against the files by read_manifest
            known_hash = read_manifest(base, "quantize" if cfg.quantize.enabled else "base")["outputs"]["content_hash"]
        base_hash = check_same_base(adapter_cfg, adapters, base, known_hash)
        trained_on = None

    # The genuine model, lazily: quantized layers stay quantized (not pipeline.modeling's CPU form);
    # nothing is read until a module is written. With --rebase: the original full-precision base.
    model, config = load_model(Path(base), lazy=True)
    base_dtype = next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    try:
        load_adapters(model, str(adapters))  # full fine-tuning: the weights themselves
    except (ValueError, KeyError) as e:  # mlx-lm's shape / missing-key errors: made for another model
        raise PipelineError(f"The adapter in {adapters} does not fit {base} ({e}): it was trained on "
                            "another base model. Fuse it into the base it was trained on.") from None
    dequantize = cfg.fuse.dequantize or rebase
    adapted: dict = {}
    fused, requantized = fuse_layers(model, dequantize, adapted)
    unadapted_quantized = {name: weight_arrays(m) for name, m in model.named_modules()
                           if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))} if dequantize else {}
    if dequantize:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        dtype = getattr(mx, cfg.fuse.dtype)
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = cfg.fuse.dtype
    else:
        dtype = base_dtype  # fused in float32 (see fuse_layers); stored as the base stores it
    cast_floats(model, dtype)
    parameters = count_parameters(model)["total"]
    # Per-layer survival, on the weights as stored (after re-quantization / the final cast): lazy
    # figures, computed with each layer when it is written (a list: one per block of rows).
    modules = dict(model.named_modules())
    blocked = {name: lora for name, lora in adapted.items() if type(lora) is LoRALinear}
    figures = {name: [layer_figures(lora, modules[name], requantized.get(name))]
               for name, lora in adapted.items() if name not in blocked}
    scale_bits = _scale_bits(model)
    weights = dict(tree_flatten(model.parameters()))
    # Plain LoRA layers (all of them in practice), and with --de-quantize the layers left quantized,
    # are computed and written in blocks of rows (modeling.Rows): the same values, 2-3x faster on CPU.
    for name, lora in blocked.items():
        figures[name] = _replace(weights, name, *fused_rows(lora, dequantize, dtype))
    if dequantize:
        for name, arrays in unadapted_quantized.items():
            _replace(weights, name, {"weight": dequantized_rows(arrays, dtype)}, [])
    del model, adapted, blocked, modules, requantized, unadapted_quantized
    # the weights dict now holds the only references: each tensor is freed once written
    check_memory(weights, adapters, dequantize)

    out = paths.fused
    expected = sum(v.nbytes for v in weights.values())  # what is written
    with atomic_path(out, expected_bytes=expected, what="the fused model") as tmp:
        stats, file_hashes = _write_fused(tmp, weights, parameters, figures)
        save_config(dict(config), tmp / "config.json")
        copy_tokenizer_files(paths.base if (paths.base / "config.json").is_file() else base, tmp)
        survival = {"layers": summarize_layers(stats)}
        delta_error = _delta_error(stats)
        skipped = end_to_end_needed(survival["layers"], parameters, requantized=not dequantize, strict=strict)
        if skipped:
            survival["end_to_end_skipped"] = skipped
        elif fused and paths.data is not None:  # end to end: adapter layers (not full fine-tuning) and data
            survival["end_to_end"] = end_to_end(paths.train_base if rebase else base, adapters, tmp, base,
                                                paths.data / "valid.jsonl", parameters)
        survival["lost"] = lost(survival)
        survival_text = summary_lines(survival)
        if survival["lost"] and strict:
            raise PipelineError("fuse --strict: " + lost_message(survival, dequantize, rebase)
                                + f" Nothing was written to {out}.")
        sizes = {
            "base": dir_size(base, "*.safetensors"),
            "adapter": choice.file.stat().st_size,
            "fused": dir_size(tmp, "*.safetensors"),
        }
        report = size_report(sizes, parameters, config.get("quantization"), scale_bits,
                             dtype.size, delta_error)
        inputs = {
            "base": {"path": str(base), "content_hash": base_hash},
            "adapter": {"path": str(adapters), "fine_tune_type": adapter_cfg.get("fine_tune_type", "lora")},
        }
        if rebase:
            inputs["trained_on"] = trained_on
        write_manifest(
            tmp, "07_fuse_lora", cfg, started,
            inputs=inputs,
            outputs={"path": str(out), "content_hash": hash_model_dir(tmp, file_hashes), "size_bytes": sizes["fused"],
                     "file_sha256": file_hashes},
            dequantized=dequantize,
            rebased=rebase,
            original_base_content_hash=base_hash if rebase else None,
            dtype=str(dtype).replace("mlx.core.", ""),
            quantization=config.get("quantization"),
            fused_layers=fused,
            report=report,
            survival=survival,
            adapter=choice.record(),
        )
    click.echo("\n".join(report["explanation"]))
    if rebase:
        click.echo(f"rebased: the adapter trained on {trained_on['path']} was added to the original weights in {base}")
    click.echo("\n".join(survival_text))
    if delta_error is not None and delta_error > MAX_DELTA_ERROR:
        click.secho(
            f"warning: re-quantization changed the fused weights by {delta_error:.0%} of the adapter's own "
            "weight change: the delta is small next to the quantization step and mostly rounding noise now. "
            "Fuse with --de-quantize to keep it exactly (or --rebase).",
            fg="yellow",
        )
    if survival["lost"]:
        click.secho("warning: " + lost_message(survival, dequantize, rebase)
                    + " (`--strict` makes this an error.)", fg="yellow")
    done(f"fused model ready: {out}")
    return FuseResult(out, dequantize, fused, parameters, sizes, delta_error, rebase, survival)


def check_rebase(cfg, paths: RunPaths, adapter_cfg: dict) -> tuple[Path, str, dict]:
    """--rebase: the adapter must have been trained on the quantized base, and that quantized base
    must have been made from this run's full-precision base. Returns (base, its hash, trained-on)."""
    if not cfg.quantize.enabled:
        raise PipelineError(
            "--rebase adds a QLoRA adapter (trained on base-quantized/) to the original full-precision "
            "base, but this run trains on the full-precision base already (quantize.enabled is false): "
            "fuse without --rebase (use --de-quantize for full precision).")
    quantized_manifest = read_manifest(paths.quantized, "quantize")
    base_manifest = read_manifest(paths.base, "base")
    quantized_hash = check_same_base(adapter_cfg, paths.adapter, paths.quantized,
                                     quantized_manifest["outputs"]["content_hash"])
    made_from = (quantized_manifest.get("inputs") or {}).get("base_content_hash")
    base_hash = (base_manifest.get("outputs") or {}).get("content_hash")
    actual = hash_model_dir(paths.base) if not base_hash else base_hash  # verified by read_manifest
    if not made_from or made_from != base_hash or actual != base_hash:
        raise PipelineError(
            f"--rebase refused: the quantized base the adapter was trained on ({paths.quantized}) was made from "
            f"a base with content hash {str(made_from)[:16]}, but {paths.base} has content hash {actual[:16]}"
            + (f" (its manifest records {str(base_hash)[:16]})" if base_hash != actual else "")
            + ". Adding the adapter to other full-precision weights than the ones it was trained against would "
            "be meaningless. Point the run at the original base (`make base` with the same model), or fuse "
            "without --rebase (--de-quantize).")
    return paths.base, actual, {"path": str(paths.quantized), "content_hash": quantized_hash}


def resolve_base(base_model: str) -> Path:
    """--base-model: a local folder, else a Hub repo id resolved to its cached snapshot."""
    from .p02_fetch_base_model import hub_snapshot, looks_like_repo_id

    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingInputError(f"--base-model {base_model}: no config.json there, not a model folder.")
        return path
    if looks_like_repo_id(base_model):
        return hub_snapshot(base_model, None)
    raise MissingInputError(f"--base-model {base_model}: no such folder, and not a Hub repo id (owner/name).")


def read_adapter(choice: AdapterChoice, given: bool) -> dict:
    """adapter_config.json of the chosen adapter (adapters/best/ or adapters/, paths.AdapterChoice); an
    adapter of a run is also checked against its 04 manifest. A given folder from elsewhere (`mlx_lm
    lora`) has no manifest: its header is validated instead."""
    adapters = choice.folder
    if not given:
        read_adapter_manifest(choice.source, choice.kind)
    elif not choice.file.is_file():
        raise MissingInputError(f"{adapters} has no adapters.safetensors: --adapter-path must be the folder "
                                "`mlx-pipeline train` (adapters/) or `mlx_lm lora` (--adapter-path) wrote.")
    elif (choice.source / MANIFEST).is_file():
        read_adapter_manifest(choice.source, choice.kind)
    else:
        check_safetensors(choice.file)
    try:
        return json.loads((adapters / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{adapters} has no adapter_config.json (rank, scale and layers of the adapter): "
                                "pass the whole folder training wrote.") from None
    except ValueError as e:
        raise PipelineError(f"{adapters}/adapter_config.json is not valid JSON ({e}).") from None


def check_same_base(adapter_cfg: dict, adapters: Path, base: Path, known_hash: str | None = None) -> str:
    """Refuse an adapter trained on another base: its deltas would be added to the wrong weights.
    An adapter made outside the pipeline records no hash: mlx-lm's shape checks are all there is."""
    recorded = adapter_cfg.get("base_model") or {}
    actual = known_hash or hash_model_dir(base)
    if "content_hash" not in recorded:
        click.echo(f"note: {adapters} records no base model hash (not made by `mlx-pipeline train`); "
                   "only the shapes of its layers are checked against the base.")
        return actual
    if recorded.get("content_hash") != actual:
        raise PipelineError(
            f"The adapter in {adapters} was trained on {recorded.get('path', 'an unrecorded base')} "
            f"(content hash {str(recorded.get('content_hash'))[:16]}), but the base {base} "
            f"has content hash {actual[:16]}. Fusing would add its deltas to the wrong weights. Fuse into the "
            f"base it was trained on (--base-model {recorded.get('path', 'PATH')}, or in a run: --run / "
            "--models-dir; quantize.enabled selects base-quantized/ or base/), or retrain on this base "
            "(`make train` / `mlx-pipeline train`)."
        )
    return actual


def fuse_layers(model, dequantize: bool, adapted: dict | None = None) -> tuple[int, dict]:
    """Replace every LoRA/DoRA layer by its own `fuse()`, lazily; returns (layers fused, the dense
    value of each layer that stays quantized, before the final cast, by name).

    Each layer is fused in float32, so the delta is added before any rounding (to bf16 or to
    the quantization grid). Those dense values give the delta error (`_delta_error`): the change
    that survived re-quantization against the exact one. Full fine-tuning leaves no such layers.
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from ..modeling import cast_floats

    fused, requantized = [], {}
    for name, m in model.named_modules():
        if not hasattr(m, "fuse"):
            continue
        cast_floats(m, mx.float32)
        layer = m.fuse(dequantize=dequantize)
        if _is_quantized(layer):
            requantized[name] = weight_arrays(layer)
        fused.append((name, layer))
        if adapted is not None:
            adapted[name] = m  # for the survival report (pipeline/survival.py)
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused), requantized


# Weights of a fused layer computed at a time (rows x input width; modeling.Rows): float32 blocks
# of 4 MB. Measured on the 1.2 B bench model: 2-3x faster per layer than whole layers.
FUSE_ELEMENTS = 1 << 20


def fused_rows(lora, dequantize: bool, dtype) -> tuple[dict, list]:
    """A plain LoRA linear layer fused as its own `fuse(dequantize)` does it (in float32, see
    fuse_layers), block of rows by block: ({"weight": Rows, ...} as stored in `dtype`, the lazy
    survival figures of each block). Fusion and quantization work row by row, so the blocks hold
    exactly the rows of the whole-layer fuse."""
    import mlx.core as mx

    from ..modeling import Rows, block_rows, dense_rows
    from ..survival import block_figures

    base = weight_arrays(lora.linear)
    n, width = lora.linear.weight.shape[0], base["weight"].shape[1]
    requantize = _is_quantized(lora.linear) and not dequantize
    width = width * 32 // base["bits"] if "scales" in base else width
    step = block_rows(width, FUSE_ELEMENTS)
    blocks, figures = {}, []
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        delta = (lora.scale * lora.lora_b.T[rows].astype(mx.float32)) @ lora.lora_a.T.astype(mx.float32)
        adapted = dense_rows(base, rows) + delta
        if requantize:
            q = dict(zip(("weight", "scales", "biases"), mx.quantize(
                adapted, base["group_size"], base["bits"], mode=base["mode"])))
            exact = {**q, "biases": q.get("biases"), "group_size": base["group_size"], "bits": base["bits"],
                     "mode": base["mode"]}
            stored = {k: v if k == "weight" else v.astype(dtype) for k, v in q.items()}
            figures.append(block_figures(lora, rows, {**exact, **stored}, exact))
        else:
            stored = {"weight": adapted.astype(dtype)}
            figures.append(block_figures(lora, rows, stored))
        for k, v in stored.items():
            blocks.setdefault(k, []).append(v)
    return {k: Rows(v) for k, v in blocks.items()}, figures


def dequantized_rows(arrays: dict, dtype):
    """A quantized weight (`modeling.weight_arrays`) de-quantized in float32 and cast to `dtype`,
    block of rows by block (modeling.Rows)."""
    from ..modeling import Rows, block_rows, dense_rows

    n, width = arrays["weight"].shape[0], arrays["weight"].shape[1] * 32 // arrays["bits"]
    step = block_rows(width, FUSE_ELEMENTS)
    return Rows([dense_rows(arrays, slice(s, min(s + step, n))).astype(dtype) for s in range(0, n, step)])


def _replace(weights: dict, module: str, tensors: dict, figures: list) -> list:
    """Put a module's tensors given in blocks of rows in place of its whole (lazy, never evaluated)
    ones; returns its figures."""
    for k, v in tensors.items():
        old = weights[f"{module}.{k}"]
        assert tuple(old.shape) == v.shape and old.dtype == v.dtype, (module, k, old.shape, v.shape, old.dtype)
        weights[f"{module}.{k}"] = v
    return figures


def _write_fused(out: Path, weights: dict, parameters: int, figures: dict) -> tuple[list[dict], dict]:
    """Write the fused weights module by module (pipeline/modeling.py), computing each fused layer's
    survival figures with it (block by block where its rows are written in blocks), so that the base
    weights it was fused into are read once and freed."""
    import mlx.core as mx

    from ..modeling import save_model_streamed

    stats, sums = [], {}

    def evaluate(module: str, arrays: list, part: int = 0, parts: int = 1) -> None:
        f = figures[module][part] if module in figures else None
        mx.eval(arrays if f is None else [*arrays, f])
        if f is None:
            return
        figures[module][part] = None
        sums[module] = [a + b for a, b in zip(sums.get(module, [0.0] * f.size), f.tolist(), strict=True)]
        if part == len(figures[module]) - 1:
            del figures[module]
            stats.append(layer_stats(module, sums.pop(module)))

    file_hashes = save_model_streamed(out, weights, parameters, evaluate)
    for name, fs in figures.items():  # none left in practice
        stats.append(layer_stats(name, [sum(x) for x in zip(*(f.tolist() for f in fs if f is not None))]))
    return stats, file_hashes


# Memory a streamed fuse needs beyond its largest layer: the interpreter, MLX, mlx-lm and the
# tokenizer (measured 0.27 GB after imports; 0.55 GB peak for a 1.2 B --no-dequantize fuse).
PROCESS_BYTES = 600 << 20
# Bytes per weight of the largest layer while it is fused: float32 W and W + dW, the stored copy.
WORK_BYTES_PER_WEIGHT = 10


def check_memory(weights: dict, adapters: Path, dequantize: bool) -> None:
    """Refuse before writing anything when this machine lacks the memory the fuse needs.

    The fuse holds one layer at a time (plus the adapter), not the model: a de-quantized output
    larger than memory is written fine, and 08 / 09 stream it too; only loading it whole in MLX
    later (06 generate, 10 verify) needs its size in memory, which is said here.
    """
    largest = max((v.size for v in weights.values()), default=0)
    output = sum(v.nbytes for v in weights.values())
    needed = PROCESS_BYTES + largest * WORK_BYTES_PER_WEIGHT + (adapters / "adapters.safetensors").stat().st_size
    available = available_memory()
    if available is None:
        return
    if needed > available:
        raise PipelineError(
            f"07 fuse needs about {human_size(needed)} of memory (the fused model, {human_size(output)}, is "
            f"written one layer at a time; its largest layer has {largest:,} weights, computed in float32), "
            f"but only {human_size(available)} is available now. Close other programs, or fuse on a machine "
            "with more memory" + (" (--no-dequantize keeps the output at the quantized size)." if dequantize
                                  else "."))
    if dequantize and output > available:
        click.secho(f"note: the de-quantized model ({human_size(output)}) is larger than the memory available now "
                    f"({human_size(available)}). It is written layer by layer, and 08 hf / 09 gguf stream it, but "
                    "loading it whole in MLX (06 generate, 10 verify's reference) will not fit on this machine; "
                    "--no-dequantize keeps the fused model at the quantized size.", fg="yellow")


def available_memory() -> int | None:
    """Bytes the system can give a new process now without swapping: MemAvailable on Linux; on macOS
    free + inactive + speculative + purgeable pages (vm_stat). None when unknown."""
    import re
    import subprocess
    import sys

    if sys.platform == "darwin":
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        page = int(m.group(1)) if (m := re.search(r"page size of (\d+) bytes", out)) else 16384
        pages = {k: int(v) for k, v in re.findall(r"^(Pages [^:]+):\s+(\d+)\.?$", out, re.M)}
        return page * sum(pages.get(f"Pages {k}", 0) for k in ("free", "inactive", "speculative", "purgeable"))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _delta_error(stats: list[dict]) -> float | None:
    """||re-quantized W + dW - (W + dW)|| / ||dW|| over the layers that stay quantized: ~0.1 is a
    healthy adapter, > 1 means rounding noise is larger than the adapter itself."""
    rated = [s for s in stats if s.get("requantized_error") is not None and s["delta_norm"] > 0]
    norm = sum(s["delta_norm"] ** 2 for s in rated)
    if not norm:
        return None
    return round(math.sqrt(sum((s["requantized_error"] * s["delta_norm"]) ** 2 for s in rated) / norm), 4)


def _is_quantized(m) -> bool:
    return "scales" in m


def _scale_bits(model) -> int:
    return next((8 * m.scales.itemsize for _, m in model.named_modules() if _is_quantized(m)), 16)


def size_report(sizes: dict, parameters: int, quantization: dict | None, scale_bits: int,
                dense_bytes: int, delta_error: float | None) -> dict:
    """The sizes, and why: size ~ parameters x bits per weight / 8."""
    bpw = 8 * sizes["fused"] / max(parameters, 1)
    lines = [
        f"size: training base {human_size(sizes['base'])} | adapter {human_size(sizes['adapter'])} | "
        f"fused {human_size(sizes['fused'])} ({sizes['fused'] / max(sizes['base'], 1):.2f}x the base); "
        f"{parameters:,} parameters at {bpw:.2f} bits each",
    ]
    if quantization:
        bits, group = quantization["bits"], quantization["group_size"]
        nominal = bits + 2 * scale_bits / group
        expected = parameters * nominal / 8
        # Per-layer entries: layers the architecture keeps at other bits (granite: 8-bit lm_head).
        other = sorted({f"{v['bits']}-bit" for v in quantization.values() if isinstance(v, dict)})
        rest = f"{', '.join(other)} layers and " if other else ""
        lines += [
            f"  quantized: {bits}-bit values plus a {scale_bits}-bit scale and bias per {group} weights = "
            f"{bits} + 2 x {scale_bits} / {group} = {nominal:.2f} bits per weight; x {parameters:,} / 8 = "
            f"{human_size(expected)} ({rest}layers left dense, such as norms, add the rest)",
            f"  --de-quantize writes every weight in 16 bits: ~ parameters x 2 bytes = {human_size(parameters * 2)}",
        ]
    else:
        expected = parameters * dense_bytes
        lines.append(f"  dense: parameters x {dense_bytes} bytes = {human_size(expected)}")
    lines.append("  the adapter adds rank x (in + out) values per adapted layer; fused, it adds no parameters")
    if delta_error is not None:
        lines.append(f"  re-quantization error: {delta_error:.0%} of the adapter's weight change")
    return {**sizes, "parameters": parameters, "bits_per_weight": round(bpw, 3),
            "expected_bytes": int(expected), "delta_error": delta_error, "explanation": lines}
