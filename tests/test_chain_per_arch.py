"""Every fixture in tests/fixtures/configs through 02 -> 10 with the real toolchain.

One test per fixture file (a new file is picked up here without an edit): 02 fetch from a local
folder, 01 data (sample task), 03 quantize 4-bit, 04 QLoRA (a learning rate that moves the logits),
07 fuse both ways, 08 Hugging Face (transformers loads it and computes what MLX computes), 09 GGUF
F16 / Q8_0 / Q4_K_M, native Q4_1 where the registry says the architecture has it, the LoRA GGUF,
and 10 verify (F16 KL <= 1e-3). The runs are export_fixtures' trained runs, shared with the 07/08
tests. The random models are not near-uniform: the MLX fused model's perplexity on the test
conversations must be far below the 49152-token vocabulary, or a KL bound would prove nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_FIXTURES, fixture_config
from export_fixtures import make_cfg
from gguf_fixtures import TEST_KEYS
from pipeline import arch
from pipeline.errors import PipelineError

GGUF_KEYS = {**TEST_KEYS, "gguf.quantizations": ["Q8_0", "Q4_K_M"]}
PROMPT = "Ken wants 2 red lamps shipped to Oslo."


def _kl_mlx_vs_transformers(mlx_dir: Path, hf_dir: Path, ids: list[int]) -> float:
    import mlx.core as mx
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.modeling import load_model

    model, _, _ = load_model(mlx_dir, "float32")
    p = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        q = hf(torch.tensor([ids])).logits[0].double().numpy()
    p, q = p - np.logaddexp.reduce(p, -1, keepdims=True), q - np.logaddexp.reduce(q, -1, keepdims=True)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _adapted_experts(adapter_dir: Path) -> list[str]:
    import mlx.core as mx

    weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    # mlx-lm's LoRASwitchLinear: lora_a [experts x r, in], lora_b [experts, out, r]
    return sorted(k[: -len(".lora_b")] for k, v in weights.items() if k.endswith(".lora_b") and v.ndim == 3)


@pytest.mark.parametrize("name", TINY_FIXTURES)
def test_chain_02_to_10(name, export_runs):
    from pipeline.gguf_native import check_native_source
    from pipeline.phases.p08_convert_to_hf import convert_to_hf
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf
    from pipeline.phases.p10_verify_gguf import verify_gguf

    config = fixture_config(name)
    registry = arch.get(config["model_type"])
    root = export_runs.trained(name)  # 02, 01, 03 (4-bit, group 32), 04 (QLoRA)
    experts = _adapted_experts(root / "t" / "adapters")
    assert bool(experts) == bool(config.get("num_local_experts")), experts  # SwitchLinear experts adapted

    # 07 --no-dequantize: the fused model stays 4-bit and transcodes to native blocks where supported.
    qcfg, qfused = export_runs.fused(name, dequantize=False)
    quant = json.loads((qfused.path / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4
    if registry.native_gguf:
        assert check_native_source(qfused.path) == "Q4_1"
    else:
        with pytest.raises(PipelineError, match="native GGUF export supports"):
            check_native_source(qfused.path)

    # 07 --de-quantize, 08: transformers loads the export and computes what MLX computes.
    dcfg, dfused = export_runs.fused(name, dequantize=True)
    hf = convert_to_hf(dcfg).path
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(hf)).encode(PROMPT)
    kl_hf = _kl_mlx_vs_transformers(dfused.path, hf, ids)

    # 09: F16, Q8_0, Q4_K_M, native Q4_1 (second fuse without de-quantizing), LoRA GGUF.
    lora_gguf = not experts
    keys = {**GGUF_KEYS, "gguf.native": registry.native_gguf, "gguf.adapter_gguf": lora_gguf}
    cfg = make_cfg(root, run=dcfg.run, **keys)
    if experts:  # llama.cpp LoRA adapters are 2-D: the LoRA GGUF is refused, naming the expert layer
        from pipeline.adapter_gguf import mlx_to_peft

        with pytest.raises(PipelineError, match=r"block_sparse_moe\.switch_mlp\.\w+: .*mixture-of-experts"):
            mlx_to_peft(root / "t" / "adapters", root / "peft", config)
        assert not (root / "peft").exists()
    gguf = convert_to_gguf(cfg)
    from gguf import GGUFReader

    written = GGUFReader(str(gguf.files["F16"])).fields["general.architecture"].contents()
    assert written == arch.gguf_arch_of(config)
    # 02 imports such a GGUF back as the registered type that writes it (mistral's GGUF says llama).
    assert arch.from_gguf_arch(written).gguf_arch == written

    # 10: every file measured in llama.cpp against the MLX fused model.
    result = verify_gguf(cfg)
    rows = {r["type"]: r for r in result.rows}
    figures = {t: (r.get("kl"), r.get("top1_percent"), r.get("perplexity")) for t, r in rows.items()}
    print(f"\n{name}: transformers KL {kl_hf:.2e}; {figures}")
    assert result.passed
    assert kl_hf <= 1e-4
    mlx_ppl = rows["MLX"]["perplexity"]
    assert mlx_ppl < config["vocab_size"] / 20, f"near-uniform logits: perplexity {mlx_ppl}"
    assert rows["F16"]["kl"] <= 1e-3 and rows["F16"]["top1_percent"] >= 95.0
    assert rows["F16"]["kl"] < rows["Q8_0"]["kl"] < rows["Q4_K_M"]["kl"]
    if registry.native_gguf:
        native = next(r for t, r in rows.items() if t.startswith("Q4_1"))
        assert native["kl"] < 0.1, figures  # a re-quantized fuse (see pipeline/survival.py), not exact
    if lora_gguf:
        pair = rows["F16 + LoRA"]
        assert pair["kl"] <= 1e-3, figures


# --- contradictory MoE configs (granitemoehybrid), fixed or refused at 02 -------------------------

DENSE, MOE = "granitemoehybrid", "granitemoehybrid-moe"


def _hub_folder(tiny_hf_model, tmp_path, name: str, **edits) -> Path:
    """A copy of a fixture folder whose config.json has keys changed (None: left out)."""
    import shutil

    folder = tmp_path / "hub"
    shutil.copytree(tiny_hf_model(name), folder)
    config = {**fixture_config(name), **edits}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("name, edits, error", [
    (DENSE, {"num_local_experts": None}, r"no `num_local_experts`: transformers would assume 8"),
    (DENSE, {"shared_intermediate_size": None}, r"no `shared_intermediate_size`: transformers would assume 1024"),
    (MOE, {"num_experts_per_tok": None}, r"num_local_experts = 4 but no `num_experts_per_tok`.*assume 2"),
    (MOE, {"num_experts_per_tok": 6}, r"num_experts_per_tok = 6 with num_local_experts = 4: .*between 1 and 4"),
    (MOE, {"num_experts_per_tok": 0}, r"num_experts_per_tok = 0 with num_local_experts = 4"),
])
def test_moe_fields_a_guess_would_fill_are_refused_at_02(name, edits, error, tiny_hf_model, tmp_path):
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    cfg = make_cfg(tmp_path / "models", _hub_folder(tiny_hf_model, tmp_path, name, **edits))
    with pytest.raises(PipelineError, match=error):
        fetch_base_model(cfg)
    assert not (tmp_path / "models" / "t" / "base").exists()


def test_dense_config_with_experts_used_is_fixed_at_02_and_llama_cpp_loads_it(tiny_hf_model, tmp_path):
    """0 experts and num_experts_per_tok left out (transformers then fills 2): llama.cpp would abort
    on `n_expert_used_max <= n_expert`. 02 writes 0 used; the converter, quantizer and runtime run."""
    from pipeline import llamacpp
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    folder = _hub_folder(tiny_hf_model, tmp_path, DENSE, num_experts_per_tok=None)
    result = fetch_base_model(make_cfg(tmp_path / "models", folder))
    assert len(result.config_changes) == 1
    assert result.config_changes[0].startswith("num_experts_per_tok = 0 (was left out, transformers fills 2;")
    assert json.loads((result.path / "config.json").read_text())["num_experts_per_tok"] == 0
    f16, q8 = tmp_path / "f16.gguf", tmp_path / "q8.gguf"
    llamacpp.convert_hf_to_gguf(result.path, f16, "f16")
    llamacpp.quantize(f16, q8, "Q8_0", 2)
    llamacpp.probe(q8)


def test_lora_gguf_of_granite_hybrid_attention_is_permuted_like_its_base(export_runs, tmp_path):
    """The base GGUF's attn_q/attn_k rows are llama.cpp's RoPE permutation of the Hub rows (test_gguf_native
    finds it on granitemoehybrid); a LoRA GGUF must permute its delta the same way. llama.cpp's LoRA
    converter alone does not here: it reads transformers 5's linear_attention/full_attention layer types,
    finds no attention layer and converts every layer as Mamba (pipeline/adapter_gguf._LORA_BOOTSTRAP)."""
    import gguf
    import mlx.core as mx

    from pipeline.adapter_gguf import convert_lora, mlx_to_peft
    from pipeline.gguf_native import llama_permutation

    run = export_runs.trained(DENSE) / "t"
    config = json.loads((run / "base" / "config.json").read_text())
    mlx_to_peft(run / "adapters", tmp_path / "peft", config)
    convert_lora(tmp_path / "peft", run / "base", tmp_path / "lora.gguf")
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(tmp_path / "lora.gguf")).tensors}
    adapter = mx.load(str(run / "adapters" / "adapters.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    layers = [i for i, t in enumerate(config["layer_types"]) if t == "attention"]
    assert layers
    for layer in layers:
        for proj, gguf_name, kv in (("q_proj", "attn_q", heads), ("k_proj", "attn_k", kv_heads)):
            name = f"blk.{layer}.{gguf_name}.weight"
            gguf_delta = tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
            a, b = (np.array(adapter[f"model.layers.{layer}.self_attn.{proj}.lora_{x}"]) for x in "ab")
            hub_delta = (a @ b).T
            tol = 2e-3 * np.abs(hub_delta).max()  # F16 rounding
            assert np.allclose(gguf_delta, hub_delta[llama_permutation(len(hub_delta), heads, kv)], atol=tol), name
            assert not np.allclose(gguf_delta, hub_delta, atol=tol), name  # the permutation is not the identity


def test_lora_gguf_of_granite_micro_is_written_as_its_base_and_loads(export_runs, tmp_path):
    """Micro (every layer attention) is converted as `granite`; its LoRA GGUF must say `granite` too
    (written as `granitehybrid`, llama.cpp died with SIGSEGV loading the pair)."""
    import gguf

    from pipeline import llamacpp
    from pipeline.adapter_gguf import convert_lora, mlx_to_peft

    run = export_runs.trained("granitemoehybrid-micro") / "t"
    mlx_to_peft(run / "adapters", tmp_path / "peft", json.loads((run / "base" / "config.json").read_text()))
    convert_lora(tmp_path / "peft", run / "base", tmp_path / "lora.gguf")
    llamacpp.convert_hf_to_gguf(run / "base", tmp_path / "base.gguf", "f16")
    archs = [gguf.GGUFReader(str(tmp_path / f)).fields["general.architecture"].contents()
             for f in ("base.gguf", "lora.gguf")]
    assert archs == ["granite", "granite"]
    llamacpp.probe(tmp_path / "base.gguf", tmp_path / "lora.gguf")


@pytest.mark.parametrize("name", [DENSE, "granitemoehybrid-micro"])
def test_granite_4_lora_gguf_pair_computes_the_trained_model(name, export_runs):
    """H-Micro (mamba + attention) and Micro (attention only): llama.cpp's F16 base + LoRA GGUF against
    MLX's quantized training base + adapter, at the F16 floor (KL ~1e-6 measured) and far below the base alone."""
    from export_fixtures import copy_run
    from pipeline.adapter_gguf import compare_with_mlx, write_adapter_gguf

    root = export_runs.trained(name)
    copy_run(root, "lora-gguf")
    cfg = make_cfg(root, run="lora-gguf", verify__max_rows=3, eval__max_tokens=8)
    write_adapter_gguf(cfg)
    report = compare_with_mlx(cfg)
    pair, alone = report["gguf_base_lora"], report["gguf_base_alone"]
    print(f"\n{name}: base + LoRA KL {pair['kl']:.2e} top-1 {pair['top1_percent']}%; base alone KL {alone['kl']:.2e}")
    assert pair["kl"] <= 1e-4, report
    assert alone["kl"] > 1000 * pair["kl"], report
