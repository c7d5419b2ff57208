"""`mlx-pipeline inspect` on our own artifacts: one tiny llama run taken through 02 base, 01 data,
03 quantize (4-bit, group 64), 04 train (with a checkpoint holding Adam's state), 07 fuse both ways
(--de-quantize float32, --no-dequantize), 08 and 09 (Q8_0), built once for the module.

The numbers are checked against what the files hold, measured independently: sizes from os.stat,
parameters by loading the tensors with MLX (the command itself reads headers only)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_FIXTURES, fixture_config
from pipeline import cli
from pipeline.artifact_sizes import CATEGORY_RULES, category_of, inspect_artifact
from pipeline.config import load_config
from pipeline.paths import RunPaths

RUN = {
    "data.sample_rows": 24, "quantize.bits": 4, "quantize.group_size": 64, "train.iters": 4, "train.batch_size": 2,
    "train.num_layers": -1, "train.steps_per_eval": 100, "train.steps_per_report": 2, "train.save_every": 2,
    "train.val_batches": 1, "fuse.dequantize": True, "fuse.dtype": "float32", "gguf.quantizations": ["Q8_0"],
    "gguf.threads": 2, "export.dtype": "float16",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_hf_model) -> Path:
    """models/t/ of a tiny llama after 02, 01, 03, 04, 07 (fused/ de-quantized, fused-native/ not), 08, 09."""
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    from pipeline.phases.p03_quantize_base_model import quantize_base_model
    from pipeline.phases.p04_train_lora import train_lora
    from pipeline.phases.p07_fuse_lora import fuse
    from pipeline.phases.p08_convert_to_hf import convert_to_hf
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    root = tmp_path_factory.mktemp("inspect")
    cfg = load_config(None, {"models_dir": str(root), "run": "t", "model.source": str(tiny_hf_model("llama")),
                             **RUN}, env={})
    fetch_base_model(cfg)
    prepare_data(cfg)
    quantize_base_model(cfg)
    train_lora(cfg)
    fuse(cfg)
    fuse(replace(cfg, fuse=replace(cfg.fuse, dequantize=False)), RunPaths(cfg, "native"))
    convert_to_hf(cfg)
    convert_to_gguf(cfg)
    return root / "t"


def checkpoint(run: Path) -> Path:
    return sorted((run / "adapters" / "checkpoints").iterdir())[-1]


def on_disk(path: Path) -> int:
    """Bytes of the artifact's files as os.stat sees them (a folder's top-level files)."""
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(os.stat(p).st_size for p in files)


def inspect_json(*paths) -> dict:
    res = CliRunner().invoke(cli.main, ["inspect", *map(str, paths), "--json"], prog_name="mlx-pipeline")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def numel(path: Path) -> dict[str, int]:
    import mlx.core as mx

    return {k: v.size for k, v in mx.load(str(path)).items()}


def test_categories_add_up_to_the_bytes_on_disk(run):
    """Every kind of artifact: categories (metadata included) sum to the files' sizes; nothing falls in
    'other'; a quantized model counts as many parameters as the full-precision one (unpacked)."""
    paths = [run / "base", run / "base-quantized", run / "adapters", run / "adapters" / "best", checkpoint(run),
             run / "fused", run / "fused-native", run / "hf", run / "gguf" / "t-Q8_0.gguf",
             run / "adapters" / "adapters.safetensors", run / "fused-native" / "model.safetensors"]
    params = {}
    for p in paths:
        if not p.exists():
            continue  # adapters/best/ only when a validation ran
        a = inspect_artifact(p, progress=False)
        assert abs(a.total_bytes - on_disk(p)) <= 0.01 * on_disk(p), (p, a.total_bytes, on_disk(p))
        assert "other" not in a.categories, (p, a.categories["other"])
        params[p.name] = a.weights().params
    base = params["base"]
    assert base == sum(numel(run / "base" / "model.safetensors").values())
    for name in ("base-quantized", "fused", "fused-native", "hf", "t-Q8_0.gguf", "model.safetensors"):
        assert params[name] == base, name
    assert params["adapters.safetensors"] == 0  # an adapter holds no base weights


def test_checkpoint_vs_adapter_explains_the_optimizer_state(run):
    ckpt = checkpoint(run)
    out = inspect_json(ckpt, run / "adapters")
    a, b = out["a"], out["b"]
    assert a["kind"] == "checkpoint" and b["kind"] == "adapter"
    trained = sum(numel(run / "adapters" / "adapters.safetensors").values())
    assert a["trainable_params"] == b["trainable_params"] == trained
    assert a["categories"]["lora"]["params"] == trained and a["categories"]["lora"]["trainable"] == "trainable"
    # Adam: m and v per trainable parameter, plus its step counter and learning rate
    optimizer = numel(ckpt / "optimizer.safetensors")
    moments = sum(v for k, v in optimizer.items() if k.endswith((".m", ".v")))
    assert a["optimizer_values"]["moments"] == 2 * trained == moments
    assert a["categories"]["optimizer"]["bytes"] + a["categories"]["lora"]["bytes"] + \
        a["categories"]["metadata"]["bytes"] == on_disk(ckpt)
    assert "optimizer" not in b["categories"]
    row = next(r for r in out["differences"] if r["category"] == "optimizer")
    assert row["delta_bytes"] == -a["categories"]["optimizer"]["bytes"]
    assert any("Adam keeps two values" in s and f"2 x {trained:,} = {2 * trained:,}" in s for s in out["explanations"])
    text = CliRunner().invoke(cli.main, ["inspect", str(ckpt), str(run / "adapters")]).output
    assert "optimizer state" in text and "Why:" in text and "Adam keeps two values" in text


def test_dequantized_vs_quantized_fuse_explains_bits_per_weight(run):
    out = inspect_json(run / "fused-native", run / "fused")
    q, f = out["a"], out["b"]
    assert "--no-dequantize" in q["description"] and "--de-quantize" in f["description"]
    # 4-bit values plus one scale and one bias per group of 64, in the scales' own dtype
    scales = _dtype_of(run / "fused-native" / "model.safetensors", "model.layers.0.self_attn.q_proj.scales")
    scale_bits = {"BF16": 16, "F16": 16, "F32": 32}[scales]
    for k in ("attention", "mlp", "embeddings"):
        assert q["categories"][k]["bits_per_weight"] == pytest.approx(4 + 2 * scale_bits / 64), k
        assert f["categories"][k]["bits_per_weight"] == 32.0, k
        assert q["categories"][k]["params"] == f["categories"][k]["params"], k
    for side, path in ((q, run / "fused-native"), (f, run / "fused")):
        assert abs(side["total_bytes"] - on_disk(path)) <= 0.01 * on_disk(path)
    why = " ".join(out["explanations"])
    assert "de-quantization: bits per weight went from" in why and "to 32.00" in why


def test_gguf_q8_0_is_8_5_bits_per_weight(run):
    path = run / "gguf" / "t-Q8_0.gguf"
    out = inspect_json(path)
    assert out["kind"] == "gguf" and out["total_bytes"] == on_disk(path)
    for k in ("attention", "mlp"):
        assert out["categories"][k]["dtype"] == "Q8_0"
        assert out["categories"][k]["bits_per_weight"] == pytest.approx(8.5)
    assert out["categories"]["norms"]["dtype"] == "F32"
    assert out["tied_embeddings"] is True and "head" not in out["categories"]  # the tiny llama ties them


def test_gguf_and_mlx_folder_compare_by_category(run):
    """The Q8_0 GGUF against the float32 fuse: same parameters per category, the quantization explained."""
    out = inspect_json(run / "fused", run / "gguf" / "t-Q8_0.gguf")
    for r in out["differences"]:
        if r["category"] not in ("metadata",):
            assert r["delta_params"] == 0, r
    assert any(s.startswith("quantization: bits per weight went from 32.00") for s in out["explanations"])


def test_lora_only_explained_against_the_base(run):
    out = inspect_json(run / "base-quantized", run / "adapters" / "adapters.safetensors")
    assert any(s.startswith("LoRA only: B holds only the adapter's A/B matrices") for s in out["explanations"])


def test_text_table_shows_every_category_and_the_total(run):
    res = CliRunner().invoke(cli.main, ["inspect", str(run / "fused-native")])
    assert res.exit_code == 0, res.output
    for word in ("embeddings", "attention", "MLP", "norms", "metadata", "total", "4-bit affine g64",
                 "100.00 % of the", "tied embeddings"):
        assert word in res.output, word


def test_progress_bar_over_shards(run, tmp_path, capsys):
    """A folder of several shards shows a tqdm bar with its rate and remaining time."""
    import mlx.core as mx

    weights = mx.load(str(run / "base" / "model.safetensors"))
    names = sorted(weights)
    for i in range(3):  # three shards, as a Hub folder of a large model has
        mx.save_safetensors(str(tmp_path / f"model-0000{i + 1}-of-00003.safetensors"),
                            {k: weights[k] for k in names[i::3]})
    shutil.copy2(run / "base" / "config.json", tmp_path / "config.json")
    a = inspect_artifact(tmp_path, progress_delay=0)
    err = capsys.readouterr().err
    assert "reading headers" in err and "3/3" in err and "<" in err  # tqdm's [elapsed<remaining]
    assert a.weights().params == inspect_artifact(run / "base", progress=False).weights().params


def _dtype_of(path: Path, name: str) -> str:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))[name]["dtype"]


@pytest.mark.parametrize("fixture", TINY_FIXTURES)
def test_every_architecture_names_fall_in_a_category(fixture):
    """MLX names (mlx-lm's model built from the fixture config) and Hugging Face names (transformers,
    on the meta device: no memory) of every supported architecture: none is left in 'other'."""
    import importlib

    import torch
    from mlx.utils import tree_flatten
    from mlx_lm.utils import MODEL_REMAPPING
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline import arch

    cfg = fixture_config(fixture)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    hf_names = [k for k, _ in hf.named_parameters()]
    arch.normalise_config(cfg)
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(cfg['model_type'], cfg['model_type'])}")
    mlx_names = [k for k, _ in tree_flatten(module.Model(module.ModelArgs.from_dict(cfg)).parameters())]
    for names in (hf_names, mlx_names):
        cats = {n: category_of(n) for n in names}
        assert "other" not in cats.values(), [n for n, c in cats.items() if c == "other"]
        assert {"embeddings", "attention", "norms"} <= set(cats.values())
        if cfg.get("layer_types") and "mamba" in cfg["layer_types"]:
            assert "ssm" in cats.values()
        if cfg.get("num_local_experts"):
            assert "experts" in cats.values()


def test_gguf_tensor_names_of_our_architectures():
    """llama.cpp's names (gguf-py's table) for every architecture we convert to."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    from pipeline import arch

    by_name = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    for gguf_arch in sorted({arch.get(fixture_config(f)["model_type"]).gguf_arch for f in TINY_FIXTURES}):
        for t in MODEL_TENSORS[by_name[gguf_arch]]:
            name = TENSOR_NAMES[t].format(bid=0, xid=0) + ".weight"
            expected = "other" if name.startswith("rope_") else None  # position tables: no category of their own
            got = category_of(name)
            assert got == expected if expected else got != "other", (gguf_arch, name, got)
    assert category_of("blk.3.ffn_up_exps.weight") == "experts" and category_of("blk.3.ssm_in.weight") == "ssm"
    assert category_of("blk.3.attn_q.weight.lora_a") == "lora" and category_of("output.weight") == "head"
    assert len(CATEGORY_RULES) >= 8


def test_bad_inputs_are_named_with_the_fix(run, tmp_path):
    def fails(path, *words):
        res = CliRunner().invoke(cli.main, ["inspect", str(path)])
        assert res.exit_code == 2, res.output
        for w in words:
            assert w in res.output, (w, res.output)

    fails(tmp_path / "nope", "no such file or folder", "Give a model folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    fails(tmp_path / "notes", "holds no .safetensors or .gguf file", "Give a model folder")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("x-F16.gguf", "x-Q8_0.gguf"):
        shutil.copy2(run / "gguf" / "t-Q8_0.gguf", two / n)
    fails(two, "unknown folder", "Inspect one file")
    # a truncated safetensors and a truncated GGUF: the header check names the defect
    src = run / "fused" / "model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    fails(cut, "truncated", "re-download or re-export it")
    g = run / "gguf" / "t-Q8_0.gguf"
    cutg = tmp_path / "cut.gguf"
    cutg.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    fails(cutg, "truncated", "re-export it with llama.cpp's converter")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    fails(bad, "not supported")


def test_bits_and_group_size_come_from_config_per_layer(tmp_path):
    """mlx-lm's mixed quantization (a per-layer entry in config.json's `quantization`): each layer is
    unpacked with its own bits, also when the weights file is named alone; the shapes alone could not
    tell 8-bit group 32 from 4-bit group 64."""
    import mlx.core as mx

    w = mx.random.normal((64, 256))
    tensors = {}
    for name, bits, group in (("model.layers.0.mlp.up_proj", 8, 32), ("model.layers.0.self_attn.q_proj", 4, 64)):
        q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        tensors.update({f"{name}.weight": q, f"{name}.scales": scales, f"{name}.biases": biases})
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": {
        "bits": 4, "group_size": 64, "model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 32}}}))
    for path in (tmp_path, tmp_path / "model.safetensors"):
        a = inspect_artifact(path, progress=False)
        assert a.categories["mlp"].params == a.categories["attention"].params == w.size
        assert a.categories["mlp"].dtype_text() == "8-bit affine g32"
        assert a.categories["attention"].dtype_text() == "4-bit affine g64"
        # 32-bit scales and biases: 8 + 64/32 and 4 + 64/64 bits per weight
        assert a.categories["mlp"].bits_per_weight == pytest.approx(10.0)
        assert a.categories["attention"].bits_per_weight == pytest.approx(5.0)
        assert a.total_bytes == on_disk(path)


def test_tied_embeddings_explained(tmp_path):
    """Two otherwise equal models, one with tie_word_embeddings: the head's bytes are named as the cause."""
    import mlx.core as mx

    weights = {"model.embed_tokens.weight": mx.zeros((4096, 64)), "model.norm.weight": mx.ones((64,)),
               "model.layers.0.mlp.up_proj.weight": mx.zeros((128, 64))}
    for name, tied in (("tied", True), ("untied", False)):
        (tmp_path / name).mkdir()
        extra = {} if tied else {"lm_head.weight": mx.zeros((4096, 64))}
        mx.save_safetensors(str(tmp_path / name / "model.safetensors"), {**weights, **extra})
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": tied}))
    out = inspect_json(tmp_path / "tied", tmp_path / "untied")
    assert out["a"]["tied_embeddings"] is True and out["b"]["tied_embeddings"] is False
    assert out["b"]["categories"]["head"]["params"] == 4096 * 64
    assert out["explanations"] == [
        f"tied embeddings: A has no separate lm_head (tie_word_embeddings: the output layer reuses the embedding "
        f"matrix); B stores one: {4096 * 64:,} parameters, 1.0 MB."]
