"""MLX-quantized weights written as GGUF blocks that carry the same values (no second quantization).

A model fused with `--no-dequantize` keeps MLX affine weights: per group of `group_size` along a
row, w = scale * q + bias. GGUF Q4_1 stores w = d * q + m per block of 32 (fp16 d and m), Q5_1 the
same with 5-bit q. So a 4-bit MLX tensor becomes Q4_1 (5-bit: Q5_1) by copying q as it is and
repeating each group's scale and bias over its 32-blocks (group 32: one to one). The only change
is rounding scale and bias to fp16; |w_gguf - w_mlx| <= (q_max |scale| + |bias|) * 2^-11 per
weight (plus 2^-25 (q_max + 1) where fp16 is subnormal). MLX's scales are negative for about half
the groups; Q4_1's d may be negative too, so they are transcoded as they are, never re-fitted.

8-bit MLX tensors have no exact GGUF form (Q8_0 has no offset): they are left as the source
file's unquantized tensor (F16 of the same dequantized values: the lossless choice, at 16 instead
of 8.5 bits per weight; Q8_0 would be a second quantization onto another grid, which is what this
file exists to avoid). mlx-lm keeps e.g. granite's lm_head at 8 bits in mixed recipes. Other bit widths
(2, 3, 6) are refused.

Everything else (metadata, tokenizer, chat template, dense tensors, tensor names and order) is
copied from the F16 GGUF that llama.cpp's converter made from the same fused model (phase 09):
each GGUF tensor is matched to its MLX module by gguf-py's tensor name map, and the row
permutation the converter applies (llama's q/k RoPE permute) is found by comparing with the F16
tensor's values, so a converter change cannot silently scramble rows. Which model types have a
native file is the registry's `Arch.native_gguf`; the gguf-py architecture is the F16 file's own
(an all-attention granitemoehybrid is written as `granite`).

granitemoehybrid: mamba in_proj/out_proj map by name. mlx-lm renames what the converter splits: a
MoE model keeps `shared_mlp.input_linear` whole (gate rows, then up rows), the converter writes
ffn_gate_shexp + ffn_up_shexp, so one MLX layer becomes two GGUF tensors of half its rows (MLX
groups run along a row, so a row split is exact); the experts (`switch_mlp.*`, 3-D
[expert, out, in]) are ffn_*_exps, transcoded as expert x out rows. mlx-lm keeps the router at 8
bits: it stays the F16 file's tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from . import arch
from .errors import PipelineError
from .fsio import atomic_path

LLAMA_FTYPE = {"Q4_1": 3, "Q5_1": 9}  # LLAMA_FTYPE_MOSTLY_*
KEPT_F16_BITS = (8,)
FP16_EPS = 2.0 ** -11  # relative rounding of fp16 (round to nearest)
FP16_SUBNORMAL = 2.0 ** -25  # absolute rounding below fp16's normal range
# MLX layers (within a decoder layer) that gguf-py's name map does not know because mlx-lm's
# sanitize renamed them: -> the GGUF tensors the converter writes, each taking an equal share of rows.
_RENAMED = {
    "shared_mlp.input_linear": ("ffn_gate_shexp", "ffn_up_shexp"),
    "block_sparse_moe.switch_mlp.gate_proj": ("ffn_gate_exps",),
    "block_sparse_moe.switch_mlp.up_proj": ("ffn_up_exps",),
    "block_sparse_moe.switch_mlp.down_proj": ("ffn_down_exps",),
}


def supported() -> list[str]:
    """Model types with a native GGUF (the registry's `Arch.native_gguf`)."""
    return [m for m in arch.supported() if arch.get(m).native_gguf]


def native_type_name(bits: int) -> str:
    return {4: "Q4_1", 5: "Q5_1"}[bits]


def check_native_source(fused_dir: Path) -> str:
    """Fail fast (before any conversion) unless `fused_dir` can be transcoded; returns the main
    native type ("Q4_1" or "Q5_1") from its config.json."""
    fused_dir = Path(fused_dir)
    if not (fused_dir / "config.json").is_file():
        raise PipelineError(f"{fused_dir}/config.json not found: the native GGUF is transcoded from the "
                            "fused MLX model. Run `make fuse` (mlx-pipeline fuse --no-dequantize) first.")
    config = json.loads((fused_dir / "config.json").read_text())
    quant = config.get("quantization")
    if not isinstance(quant, dict) or "bits" not in quant:
        raise PipelineError(
            f"{fused_dir} is not MLX-quantized (no `quantization` in config.json): a native GGUF transcodes "
            "MLX's quantized weights. Fuse with --no-dequantize first (or use the Q8_0/K-quant files).")
    model_type = config.get("model_type")
    if model_type not in supported():
        raise PipelineError(
            f"{fused_dir}: native GGUF export supports model types {', '.join(supported())}, not '{model_type}'. "
            "Use the llama.cpp-quantized files (gguf.quantizations) for this model.")
    if quant.get("mode", "affine") != "affine":
        raise PipelineError(f"{fused_dir}: MLX quantization mode '{quant['mode']}' is not affine: no GGUF equivalent.")
    bits = {int(quant["bits"])} | {int(v["bits"]) for v in quant.values() if isinstance(v, dict) and "bits" in v}
    if bad := sorted(bits - {4, 5, *KEPT_F16_BITS}):
        raise PipelineError(f"{fused_dir}: {bad[0]}-bit MLX weights have no exact GGUF block type "
                            "(native export: 4-bit -> Q4_1, 5-bit -> Q5_1, 8-bit kept unquantized).")
    if not bits & {4, 5}:
        raise PipelineError(f"{fused_dir} has no 4- or 5-bit layers to transcode: the native GGUF would be "
                            "the F16 file. Use gguf.quantizations (Q8_0) instead.")
    return native_type_name(int(quant["bits"])) if int(quant["bits"]) in (4, 5) else native_type_name(min(bits))


def write_native_gguf(fused_dir: Path, f16_gguf: Path, out: Path) -> dict:
    """Write `out`: `f16_gguf` with every MLX 4/5-bit weight of `fused_dir` as Q4_1/Q5_1 blocks.

    Returns stats: tensors transcoded, per-type counts, max |GGUF dequantized - MLX dequantized|.
    """
    import gguf

    fused_dir, f16_gguf, out = Path(fused_dir), Path(f16_gguf), Path(out)
    config = json.loads((fused_dir / "config.json").read_text())
    check_native_source(fused_dir)
    quant = config["quantization"]
    if not f16_gguf.is_file():
        raise PipelineError(f"{f16_gguf} not found: the native GGUF is built from phase 09's F16 file.")

    weights = _load_mlx(fused_dir)
    reader = gguf.GGUFReader(str(f16_gguf))
    arch_name = _field(reader, "general.architecture")
    n_blocks = int(_field(reader, f"{arch_name}.block_count"))
    n_head = _per_layer_max(_field(reader, f"{arch_name}.attention.head_count"))
    n_head_kv = _per_layer_max(_field(reader, f"{arch_name}.attention.head_count_kv", n_head))
    model_arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if model_arch is None:
        raise PipelineError(f"{f16_gguf.name}: gguf-py has no architecture '{arch_name}'.")
    name_map = gguf.get_tensor_name_map(model_arch, n_blocks)

    # GGUF tensor name -> MLX module (quantized modules only).
    modules = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    if not modules:
        raise PipelineError(f"{fused_dir} has no quantized layers (no .scales tensors). "
                            "Fuse with --no-dequantize first.")
    gguf_names = {t.name: t for t in reader.tensors}
    to_module = {}  # GGUF tensor -> (MLX module, its share of the module's rows: index, of how many)
    for module in modules:
        for part, name in enumerate(names := _gguf_names(module, name_map, gguf_names)):
            to_module[name] = (module, part, len(names))
        if not names:
            raise PipelineError(f"MLX layer {module} has no tensor in {f16_gguf.name}: was the F16 file made "
                                f"from {fused_dir}?")

    stats = {"transcoded": 0, "types": {}, "kept_f16": [], "permuted": [], "max_abs_diff": 0.0,
             "max_abs_diff_bound": 0.0, "tensors": {}}
    replaced: dict[str, tuple[np.ndarray, object]] = {}
    for name, (module, part, parts) in to_module.items():
        bits, group = _layer_quant(quant, module)
        if bits in KEPT_F16_BITS:
            stats["kept_f16"].append(name)
            continue
        if bits not in (4, 5):
            raise PipelineError(f"{module}: {bits}-bit MLX weights have no exact GGUF block type "
                                "(native export: 4-bit -> Q4_1, 5-bit -> Q5_1, 8-bit kept unquantized).")
        if group % 32:
            raise PipelineError(f"{module}: group size {group} is not a multiple of GGUF's 32-blocks.")
        mode = (quant.get(module) if isinstance(quant.get(module), dict) else quant).get("mode", "affine")
        if mode != "affine":
            raise PipelineError(f"{module}: MLX quantization mode '{mode}' is not affine: no GGUF equivalent.")
        q, scales, biases = _unpack(weights, module, bits, group)
        dense = _mlx_dense(weights, module, bits, group)
        share = slice(part * len(q) // parts, (part + 1) * len(q) // parts)
        q, scales, biases, dense = q[share], scales[share], biases[share], dense[share]
        mine = np.repeat(scales, group, axis=1) * q + np.repeat(biases, group, axis=1)
        if not np.allclose(mine, dense, rtol=1e-6, atol=1e-7):
            raise PipelineError(f"{module}: unpacked {bits}-bit values do not reproduce mx.dequantize.")

        t = gguf_names[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(dense.shape[0], -1)  # F16, BF16 or F32
        perm, how = _row_permutation(name, dense, ref, n_head, n_head_kv)
        if how != "identity":
            stats["permuted"].append(name)
            q, scales, biases, dense = q[perm], scales[perm], biases[perm], dense[perm]

        qtype = getattr(gguf.GGMLQuantizationType, native_type_name(bits))
        blocks = _pack(q, scales, biases, group, bits)
        back = gguf.quants.dequantize(blocks, qtype)
        blocks = blocks.reshape(*t.data.shape[:-1], -1)  # experts: [expert, out, bytes]
        diff = float(np.abs(back - dense).max())
        qmax = 2 ** bits - 1
        bound = (qmax * np.abs(np.repeat(scales, group, 1)) + np.abs(np.repeat(biases, group, 1))) * FP16_EPS \
            + (qmax + 1) * FP16_SUBNORMAL
        excess = float((np.abs(back - dense) - bound * (1 + 1e-3)).max())
        if not np.isfinite(back).all() or excess > 0:
            raise PipelineError(f"{module}: transcoded {qtype.name} weights differ from MLX's by more than fp16 "
                                f"rounding of scale and bias (max {diff:.3g}); scales out of fp16 range?")
        replaced[name] = (blocks, qtype)
        stats["transcoded"] += 1
        stats["types"][qtype.name] = stats["types"].get(qtype.name, 0) + 1
        stats["max_abs_diff"] = max(stats["max_abs_diff"], diff)
        stats["max_abs_diff_bound"] = max(stats["max_abs_diff_bound"], float(bound.max()))
        stats["tensors"][name] = {"mlx": module, "rows": [share.start, share.stop], "type": qtype.name, "bits": bits,
                                  "group_size": group, "permutation": how, "max_abs_diff": diff}
    if not replaced:
        raise PipelineError(f"{fused_dir} has no 4- or 5-bit layers to transcode: the native GGUF would be "
                            "the F16 file. Use gguf.quantizations (Q8_0) instead.")
    main_type = max(stats["types"], key=stats["types"].get)

    writer = gguf.GGUFWriter(None, arch=arch_name, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        value = field.contents()
        if field.name == "general.file_type":
            value = LLAMA_FTYPE[main_type]
        if field.name == "general.alignment":
            writer.data_alignment = int(value)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    if "general.file_type" not in reader.fields:
        writer.add_file_type(LLAMA_FTYPE[main_type])
    if "general.quantization_version" not in reader.fields:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in reader.tensors:
        if t.name in replaced:
            blocks, qtype = replaced[t.name]
            writer.add_tensor(t.name, blocks, raw_dtype=qtype, tensor_endianess=reader.endianess)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type, tensor_endianess=reader.endianess)
    with atomic_path(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    stats["file_type"] = main_type
    stats["size_bytes"] = out.stat().st_size
    return stats


def _gguf_names(module: str, name_map, gguf_names) -> list[str]:
    name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
    if name in gguf_names:
        return [name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    renamed = [f"blk.{m[1]}.{n}.weight" for n in _RENAMED.get(m[2], ())] if m else []
    return renamed if renamed and all(n in gguf_names for n in renamed) else []


def _per_layer_max(value) -> int:
    """head counts are one number, or one per layer (hybrids: 0 for the mamba layers)."""
    return int(max(value)) if isinstance(value, list) else int(value)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise PipelineError(f"GGUF has no `{key}` metadata.")
        return default
    return f.contents()


def _load_mlx(model_dir: Path) -> dict:
    import mlx.core as mx

    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    if not weights:
        raise PipelineError(f"{model_dir} has no .safetensors weights.")
    return weights


def _layer_quant(quant: dict, module: str) -> tuple[int, int]:
    """(bits, group_size) of one layer: mlx-lm's per-layer entry, else the model's."""
    own = quant.get(module)
    own = own if isinstance(own, dict) else {}
    return int(own.get("bits", quant["bits"])), int(own.get("group_size", quant["group_size"]))


def _f32(a) -> np.ndarray:
    import mlx.core as mx

    return np.array(a.astype(mx.float32))


def _unpack(weights: dict, module: str, bits: int, group: int):
    """MLX packed weight -> (q uint8 [rows, cols], scales f32 [rows, groups], biases f32); a 3-D
    expert weight [expert, out, in] counts expert x out rows."""
    packed = np.array(weights[module + ".weight"])
    packed = packed.reshape(-1, packed.shape[-1])
    if packed.dtype != np.uint32:
        raise PipelineError(f"{module}.weight is {packed.dtype}, expected MLX's packed uint32.")
    scales = _f32(weights[module + ".scales"])
    if module + ".biases" not in weights:
        raise PipelineError(f"{module} has no biases: not MLX affine quantization.")
    biases = _f32(weights[module + ".biases"])
    scales, biases = scales.reshape(-1, scales.shape[-1]), biases.reshape(-1, biases.shape[-1])
    rows = packed.shape[0]
    cols = packed.shape[1] * 32 // bits
    if cols != scales.shape[1] * group:
        raise PipelineError(f"{module}: {cols} columns at {bits} bits but {scales.shape[1]} groups of {group}.")
    # MLX packs values as a little-endian bit stream (4/8 bits: 32/bits per uint32, low bits first).
    raw = packed.astype("<u4").view(np.uint8).reshape(rows, -1)
    bitstream = np.unpackbits(raw, axis=1, bitorder="little").reshape(rows, cols, bits)
    q = (bitstream.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    return q, scales, biases


def _mlx_dense(weights: dict, module: str, bits: int, group: int) -> np.ndarray:
    """MLX's own dequantization in float32 (the reference the GGUF must reproduce)."""
    import mlx.core as mx

    w = mx.dequantize(weights[module + ".weight"], weights[module + ".scales"].astype(mx.float32),
                      weights[module + ".biases"].astype(mx.float32), group_size=group, bits=bits)
    return np.array(w.astype(mx.float32)).reshape(-1, w.shape[-1])


def llama_permutation(rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Row order of llama.cpp's LlamaModel.permute (q/k for its RoPE layout): out[i] = in[perm[i]]."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _row_permutation(name: str, dense: np.ndarray, ref: np.ndarray, n_head: int, n_head_kv: int):
    """The row order under which the MLX weights equal the F16 GGUF tensor (fp16/bf16 rounding)."""
    rows = dense.shape[0]
    candidates = [("identity", np.arange(rows))]
    for label, h, kv in (("llama q permute", n_head, n_head), ("llama k permute", n_head, n_head_kv)):
        heads = kv if kv is not None and kv != h else h
        if rows % (2 * heads) == 0:
            candidates.append((label, llama_permutation(rows, h, kv)))
    # Phase 08 exports in bf16 or fp16 and the converter writes fp16: allow bf16 rounding twice.
    tol = 2.0 ** -7 * np.abs(dense).max(axis=1, keepdims=True) + 1e-6
    if ref.shape != dense.shape:
        raise PipelineError(f"{name}: F16 GGUF shape {ref.shape} differs from the MLX layer's {dense.shape}.")
    for label, perm in candidates:
        if (np.abs(dense[perm] - ref) <= tol[perm]).all():
            return perm, label
    raise PipelineError(f"{name}: the F16 GGUF's values match the MLX fused weights under no known row order "
                        "(identity, llama q/k permute): was it converted from this fused model?")


def _pack(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int, bits: int) -> np.ndarray:
    """Q4_1 / Q5_1 blocks (bytes, [rows, blocks * type_size]): d, m (fp16), [qh], nibbles.

    Nibble layout as ggml's: byte j of a block holds value j (low) and value j + 16 (high);
    Q5_1's qh bit i (little-endian uint32) is bit 4 of value i.
    """
    rows, cols = q.shape
    nb = cols // 32
    d = np.repeat(scales, group // 32, axis=1).astype(np.float16)  # [rows, nb]
    m = np.repeat(biases, group // 32, axis=1).astype(np.float16)
    qb = q.reshape(rows, nb, 32)
    lo = (qb[..., :16] & 0x0F) | ((qb[..., 16:] & 0x0F) << 4)
    parts = [d.reshape(rows, nb, 1).view(np.uint8), m.reshape(rows, nb, 1).view(np.uint8)]
    if bits == 5:
        parts.append(np.packbits((qb >> 4) & 1, axis=-1, bitorder="little"))  # 4 bytes
    parts.append(lo.astype(np.uint8))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))
