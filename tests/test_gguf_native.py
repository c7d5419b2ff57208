"""Native GGUF export: MLX 4/5-bit affine weights written as Q4_1/Q5_1 blocks with the same values.

Tiny llama runs: trained + fused with --no-dequantize (4-bit, group 32, the export fixtures'
run), and the tiny model quantized directly by mlx-lm at group 64 (4-bit) and group 32 (5-bit);
a tiny granite (4-bit, group 64, untied lm_head), and the Granite 4.0 H shapes (granitemoehybrid
dense hybrid and MoE: mamba in_proj/out_proj, the shared MLP split into gate/up, 3-D experts).
Each goes through phase 09 (F16 + Q8_0 + Q4_K_M from llama.cpp), then `write_native_gguf`.
Checked: (a) the native file's weights, dequantized by gguf-py, equal MLX's dequantized weights up
to fp16 rounding of scale and bias: |diff| <= (q_max |scale| + |bias|) * 2^-11 (+ 2^-25 (q_max + 1)
for fp16 subnormals), and everything else is the F16 file's, byte for byte; (b) llama.cpp loads and
runs it; (c) its next-token KL to the MLX model (float32) is no larger than Q8_0's and at least 3x
smaller than Q4_K_M's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gguf_fixtures import make_cfg, make_run
from pipeline.errors import PipelineError
from pipeline.gguf_native import FP16_EPS, FP16_SUBNORMAL, llama_permutation, write_native_gguf

QUANTS = {"gguf.quantizations": ["Q8_0", "Q4_K_M"], "gguf.threads": 2}
TEXTS = ["Ken wants 2 red lamps shipped to Oslo. Answer as JSON.", "The capital of France is Paris, and",
         '{"item": "lamp", "qty": 3, "city": "Oslo"}']
_RUNS: dict[str, tuple] = {}


def _quantized_copy(src: Path, dst: Path, bits: int, group: int) -> Path:
    """The tiny HF model quantized by mlx-lm (affine, float32 scales), as an MLX model folder."""
    from mlx_lm.utils import load, quantize_model, save

    model, tok, config = load(str(src), return_config=True)
    model, config = quantize_model(model, config, group, bits)
    save(dst, src, model, tok, config)
    return dst


def native_run(key: str, tmp_path_factory, tiny_hf_model, export_runs):
    """(cfg, GGUFResult, native stats, native path) for one kind of quantized run, once per session."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    if key not in _RUNS:
        root = tmp_path_factory.mktemp(f"native-{key}")
        if key == "trained-q4-g32":
            fused_cfg, _ = export_runs.fused("llama", dequantize=False)
            shutil.copytree(Path(fused_cfg.models_dir) / fused_cfg.run, root / "t",
                            ignore=shutil.ignore_patterns("hf", "gguf", "checkpoints"))
            cfg = make_cfg(root, "t", **QUANTS)
        else:
            model_type, bits, group = {"q4-g64": ("llama", 4, 64), "q5-g32": ("llama", 5, 32),
                                       "granite-q4-g64": ("granite", 4, 64),
                                       "hybrid-q4-g64": ("granitemoehybrid", 4, 64),
                                       "moe-q4-g32": ("granitemoehybrid-moe", 4, 32)}[key]
            model = _quantized_copy(tiny_hf_model(model_type), root / "model", bits, group)
            cfg = make_run(root, model, hf=False, **QUANTS)
        result = convert_to_gguf(cfg)
        native = root / "t" / "gguf" / "t-native.gguf"
        stats = write_native_gguf(root / "t" / "fused", result.files["F16"], native)
        _RUNS[key] = (cfg, result, stats, native)
    return _RUNS[key]


# 8-bit layers mlx-lm keeps (granite: o/down_proj, lm_head; MoE: each layer's router)
EIGHT_BIT = {"granite-q4-g64": 5, "moe-q4-g32": 4}


@pytest.mark.parametrize("key", ["trained-q4-g32", "q4-g64", "q5-g32", "granite-q4-g64", "hybrid-q4-g64", "moe-q4-g32"])
def test_native_weights_equal_mlx_up_to_fp16_scales(key, tmp_path_factory, tiny_hf_model, export_runs):
    import gguf
    import mlx.core as mx

    cfg, result, stats, native = native_run(key, tmp_path_factory, tiny_hf_model, export_runs)
    fused = Path(cfg.models_dir) / "t" / "fused"
    qtype = "Q5_1" if key.startswith("q5") else "Q4_1"
    config = json.loads((fused / "config.json").read_text())
    bits, group = config["quantization"]["bits"], config["quantization"]["group_size"]
    weights = {}
    for f in fused.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    layers = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    eight_bit = [m for m in layers if isinstance(config["quantization"].get(m), dict)
                 and config["quantization"][m]["bits"] == 8]  # mlx-lm's granite recipe: o/down_proj, lm_head
    # A MoE model's shared_mlp.input_linear is two GGUF tensors (gate, up): one more per layer.
    split = [m for m in layers if m.endswith("shared_mlp.input_linear")]
    n_quantized = len(layers) - len(eight_bit) + len(split)
    assert stats["transcoded"] == n_quantized > 0 and stats["types"] == {qtype: n_quantized}
    # 8-bit layers have no exact GGUF block: they stay the F16 file's tensors (checked below).
    assert len(stats["kept_f16"]) == len(eight_bit) == EIGHT_BIT.get(key, 0)
    # llama.cpp's converter permutes q and k rows for RoPE; the transcoder found and applied it.
    attention = [i for i, t in enumerate(config.get("layer_types") or ["attention"] * 2) if t == "attention"]
    assert sorted(stats["permuted"]) == sorted(f"blk.{i}.attn_{x}.weight" for i in attention for x in "qk")
    if key.startswith("moe"):
        moe_tensors = {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ssm_in.weight"}
        assert moe_tensors <= set(stats["tensors"])

    src, out = gguf.GGUFReader(str(result.files["F16"])), gguf.GGUFReader(str(native))
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    fields = {k: f.contents() for k, f in out.fields.items() if not k.startswith("GGUF.")}
    expected = {k: f.contents() for k, f in src.fields.items() if not k.startswith("GGUF.")}
    expected["general.file_type"] = {"Q4_1": 3, "Q5_1": 9}[qtype]
    expected.setdefault("general.quantization_version", gguf.GGML_QUANT_VERSION)
    assert fields == expected

    arch = src.fields["general.architecture"].contents()
    n_head = src.fields[f"{arch}.attention.head_count"].contents()
    n_kv = src.fields[f"{arch}.attention.head_count_kv"].contents()
    n_kv = max(n_kv) if isinstance(n_kv, list) else n_kv  # hybrids: one per layer, 0 for mamba
    qmax = 2 ** bits - 1
    checked = 0
    for s, t in zip(src.tensors, out.tensors):
        info = stats["tensors"].get(t.name)
        if info is None:  # not quantized in MLX: the F16 file's tensor, byte for byte
            assert t.tensor_type == s.tensor_type and bytes(t.data) == bytes(s.data), t.name
            continue
        assert t.tensor_type.name == qtype and info["group_size"] == group
        m = info["mlx"]
        scales = weights[m + ".scales"].astype(mx.float32)
        biases = weights[m + ".biases"].astype(mx.float32)
        dense = np.array(mx.dequantize(weights[m + ".weight"], scales, biases, group_size=group, bits=bits))
        scales, biases = np.repeat(np.array(scales), group, -1), np.repeat(np.array(biases), group, -1)
        # 3-D experts count expert x out rows; a split layer gives each GGUF tensor its share of rows.
        share = slice(*info["rows"])
        dense, scales, biases = (a.reshape(-1, a.shape[-1])[share] for a in (dense, scales, biases))
        if t.name.endswith("attn_q.weight"):
            perm = llama_permutation(dense.shape[0], n_head, n_head)
        elif t.name.endswith("attn_k.weight"):
            perm = llama_permutation(dense.shape[0], n_head, n_kv)
        else:
            perm = np.arange(dense.shape[0])
        dense, scales, biases = dense[perm], scales[perm], biases[perm]
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(dense.shape)
        bound = (qmax * np.abs(scales) + np.abs(biases)) * FP16_EPS + (qmax + 1) * FP16_SUBNORMAL
        assert (np.abs(back - dense) <= bound * (1 + 1e-3)).all(), t.name
        assert np.abs(back - dense).max() <= stats["max_abs_diff"] + 1e-12
        checked += 1
    assert checked == n_quantized
    # The permutation is llama.cpp's: the F16 tensor of the same weights agrees with it.
    q_name = f"blk.{attention[0]}.attn_q.weight"
    q_f16 = next(t for t in src.tensors if t.name == q_name)
    q_native = next(t for t in out.tensors if t.name == q_name)
    a = np.asarray(q_f16.data, dtype=np.float32)
    b = gguf.quants.dequantize(q_native.data, q_native.tensor_type).reshape(a.shape)
    assert np.abs(a - b).max() <= 0.01 * np.abs(a).max()
    assert stats["size_bytes"] == native.stat().st_size < result.files["F16"].stat().st_size


@pytest.mark.parametrize("key", ["trained-q4-g32", "q4-g64", "moe-q4-g32"])
def test_native_runs_in_llama_cpp_closer_than_q8_0(key, tmp_path_factory, tiny_hf_model, export_runs):
    from pipeline import llamacpp
    from pipeline.agreement import Conversation, compare, gguf_metadata, gguf_scorer, mlx_scorer
    from pipeline.modeling import load_model

    cfg, result, stats, native = native_run(key, tmp_path_factory, tiny_hf_model, export_runs)
    model, _, _ = load_model(Path(cfg.models_dir) / "t" / "fused", "float32")  # dequantized on CPU: exact
    kl = {}
    for name, path in [("native", native), ("Q8_0", result.files["Q8_0"]), ("Q4_K_M", result.files["Q4_K_M"])]:
        llm = llamacpp.open_gguf(path, 256, 0)
        try:
            if name == "native":
                assert gguf_metadata(llm)["type"] == "Q4_1"
                text = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
                assert text["choices"][0]["text"] is not None
            with llamacpp.captured_log():
                convs = [Conversation(llm.tokenize(t.encode(), add_bos=False), 0) for t in TEXTS]
                kl[name] = compare(mlx_scorer(model), gguf_scorer(llm), convs)["kl"]
        finally:
            llm.close()
    print(key, kl)
    assert kl["native"] <= kl["Q8_0"], kl
    assert 3 * kl["native"] <= kl["Q4_K_M"], kl


def test_refuses_dense_models_and_other_architectures(tmp_path, tmp_path_factory, tiny_hf_model, export_runs):
    cfg, result, _, _ = native_run("q4-g64", tmp_path_factory, tiny_hf_model, export_runs)
    f16 = result.files["F16"]
    out = tmp_path / "out.gguf"
    with pytest.raises(PipelineError, match=r"not MLX-quantized.*Fuse with --no-dequantize first"):
        write_native_gguf(tiny_hf_model("llama"), f16, out)

    fused = tmp_path / "fused"
    shutil.copytree(Path(cfg.models_dir) / "t" / "fused", fused)
    config = json.loads((fused / "config.json").read_text())
    (fused / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(PipelineError, match=r"supports model types llama, granite, granitemoehybrid.*, not 'gpt2'"):
        write_native_gguf(fused, f16, out)

    q = dict(config["quantization"], bits=3)
    (fused / "config.json").write_text(json.dumps({**config, "quantization": q}))
    with pytest.raises(PipelineError, match=r"3-bit MLX weights have no exact GGUF block type"):
        write_native_gguf(fused, f16, out)
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_phase_09_writes_the_native_file_with_native_flag(tmp_path, tmp_path_factory, tiny_hf_model, export_runs):
    """`mlx-pipeline gguf --native` (alias --no-dequantize): the hook in phase 09, size table and manifest."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    cfg, _, stats, native = native_run("q4-g64", tmp_path_factory, tiny_hf_model, export_runs)
    shutil.copytree(Path(cfg.models_dir) / "t", tmp_path / "t", ignore=shutil.ignore_patterns("gguf"))
    result = convert_to_gguf(make_cfg(tmp_path, "t", **{"gguf.quantizations": ["Q8_0"], "gguf.native": True}))
    path = result.files["Q4_1-native"]
    assert path.name == "t-Q4_1-native.gguf" and path.stat().st_size == native.stat().st_size
    manifest = json.loads((tmp_path / "t" / "gguf" / "manifest.json").read_text())
    assert manifest["native"]["transcoded"] == stats["transcoded"] > 0
    assert "Q4_1-native" in manifest["outputs"]["files"]

    dense = tmp_path / "dense"
    make_run(dense, tiny_hf_model("llama"), hf=False)
    with pytest.raises(PipelineError, match="Fuse with --no-dequantize first"):
        convert_to_gguf(make_cfg(dense, "t", **{"gguf.native": True}))
    assert not (dense / "t" / "hf").exists()
