"""09 convert to GGUF with the real llama.cpp converter and quantizer (pinned llama-cpp-python).

Tiny random models of each architecture go HF -> F16 -> Q8_0 / Q5_K_M / Q4_K_M; the file types
llama.cpp reads back, sizes and bits per weight are checked here, numerical parity in
test_p10_verify.py. Also: the toolchain fetch, and each way the phase must refuse or fail.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_fixtures import ALL_TYPES, converted_run, copy_run, make_cfg, make_run, rerecord
from pipeline import cli, llamacpp
from pipeline.config import load_config
from pipeline.errors import MissingInputError, PipelineError
from pipeline.fsio import sha256_file
from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

# llama.cpp's general.file_type of each output
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}


def gguf_meta(path: Path) -> dict:
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).metadata


@pytest.mark.parametrize("model_type", ["llama", "granite", "granitemoehybrid"])
def test_convert_every_type_per_architecture(tmp_path_factory, tiny_hf_model, model_type):
    from pipeline import arch

    cfg, result = converted_run(tmp_path_factory, tiny_hf_model, model_type)
    out = Path(cfg.models_dir) / "t" / "gguf"
    assert list(result.files) == ["F16", *ALL_TYPES]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json"] + [f"t-{t}.gguf" for t in result.files])

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"] == result.parameters == llamacpp.n_params(result.files["F16"])
    sizes = {}
    for t, path in result.files.items():
        meta = gguf_meta(path)
        assert meta["general.architecture"] == arch.get(model_type).gguf_arch
        assert int(meta["general.file_type"]) == FILE_TYPES[t], t
        entry = manifest["outputs"]["files"][t]
        sizes[t] = path.stat().st_size
        assert entry["size_bytes"] == sizes[t] and entry["sha256"] == sha256_file(path)
        assert entry["bits_per_weight"] == pytest.approx(sizes[t] * 8 / result.parameters, abs=0.01)
    # Quantized files are smaller than the F16 one. (Tiny models: the 49152-token vocabulary in the
    # metadata, and rows too narrow for K-quants, keep the ratios far from a real model's.)
    assert all(sizes[t] < sizes["F16"] for t in ALL_TYPES)
    tensors_f16 = manifest["parameters"] * 2
    assert sizes["F16"] > tensors_f16 and sizes["Q8_0"] < 0.8 * sizes["F16"]


def test_cli_quantization_alone_replaces_stale_outputs(tmp_path, tmp_path_factory, tiny_hf_model):
    """`mlx-pipeline gguf --quantization Q8_0`: F16 + Q8_0 only; the earlier Q4/Q5 files are removed."""
    cfg, _ = converted_run(tmp_path_factory, tiny_hf_model, "llama")
    cfg = copy_run(cfg, tmp_path)
    args = ["gguf", "--run", "t", "--models-dir", str(tmp_path), "--quantization", "Q8_0", "--threads", "2"]
    res = CliRunner().invoke(cli.main, args, env={"QUANTS": "", "TEST_MODE": ""})
    assert res.exit_code == 0, res.output
    out = tmp_path / "t" / "gguf"
    assert sorted(p.name for p in out.glob("*.gguf")) == ["t-F16.gguf", "t-Q8_0.gguf"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["outputs"]["files"]) == ["F16", "Q8_0"]
    assert manifest["config"]["gguf"]["quantizations"] == ["Q8_0"]
    assert "| Q8_0 | t-Q8_0.gguf |" in res.output
    assert not list(out.glob(".*tmp*"))


def test_quantizations_from_environment_and_flags(fresh_env):
    assert load_config(None, {}, env={"QUANTS": "Q4_K_M Q8_0"}).gguf.quantizations == ["Q4_K_M", "Q8_0"]
    cfg = load_config(None, {"gguf.quantizations": "Q5_K_M,Q8_0"}, env=fresh_env)
    assert cfg.gguf.quantizations == ["Q5_K_M", "Q8_0"]
    with pytest.raises(PipelineError, match="Q4_K_X not allowed; choose from: F16, BF16, Q8_0"):
        load_config(None, {"gguf.quantizations": "Q4_K_X"}, env=fresh_env)
    assert {llamacpp.ftype(t) for t in ("Q4_K_M", "Q5_K_M", "Q8_0")} == {15, 17, 7}


def test_fused_only_run_is_exported_to_hf_first(tmp_path, tiny_hf_model):
    """A run that stopped after 07 fuse: gguf runs 08 first, then converts its output."""
    cfg = make_run(tmp_path, tiny_hf_model("llama"), hf=False, **{"gguf.quantizations": ["Q8_0"]})
    result = convert_to_gguf(cfg)
    hf = tmp_path / "t" / "hf"
    assert json.loads((hf / "manifest.json").read_text())["phase"] == "08_convert_to_hf"
    assert list(result.files) == ["F16", "Q8_0"]
    assert llamacpp.n_params(result.files["Q8_0"]) == result.parameters > 0


def test_missing_inputs_name_the_command(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(MissingInputError, match=r"make fuse"):
        convert_to_gguf(cfg)


def test_unsupported_model_type_fails_early_with_the_supported_list(tmp_path, tiny_hf_model):
    cfg = make_run(tmp_path, tiny_hf_model("llama"))
    config_path = tmp_path / "t" / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    rerecord(config_path.parent)
    started = time.time()
    with pytest.raises(PipelineError, match=r"model_type 'gpt_neox'.*Supported model types: llama, "):
        convert_to_gguf(cfg)
    assert time.time() - started < 10 and not (tmp_path / "t" / "gguf").exists()

    # Known to the registry, but an architecture class llama.cpp's converter has none of.
    config_path.write_text(json.dumps({**config, "architectures": ["LlamaForSomethingElse"]}))
    rerecord(config_path.parent)
    with pytest.raises(PipelineError,
                       match=r"cannot convert architecture 'LlamaForSomethingElse'.*Supported model types: llama"):
        convert_to_gguf(cfg)
    known = llamacpp.converter_architectures()
    assert {"LlamaForCausalLM", "GraniteForCausalLM", "GraniteMoeHybridForCausalLM"} <= known


def test_damaged_weights_are_named_before_the_converter_runs_and_leave_no_file(tmp_path, tiny_hf_model):
    cfg = make_run(tmp_path, tiny_hf_model("llama"))
    weights = tmp_path / "t" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated safetensors
    rerecord(weights.parent)
    with pytest.raises(PipelineError, match=r"model.safetensors: header length .* runs past the end of the file"):
        convert_to_gguf(cfg)
    out = tmp_path / "t" / "gguf"
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*")) and not (out / "manifest.json").exists()


def test_missing_toolchain_names_make_setup(tmp_path, monkeypatch, tiny_hf_model):
    cfg = make_run(tmp_path, tiny_hf_model("llama"))
    monkeypatch.setenv("MLX_PIPELINE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingInputError, match=r"converter is missing.*empty-cache.*Run `make setup` "
                                                 r"\(or `python -m pipeline.llamacpp fetch`\)"):
        convert_to_gguf(cfg)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "no-checkout"))
    with pytest.raises(MissingInputError, match=r"no-checkout \(LLAMA_CPP_DIR\). Run `make setup`"):
        convert_to_gguf(cfg)
    res = CliRunner().invoke(cli.main, ["gguf", "--run", "t", "--models-dir", str(tmp_path)])
    assert res.exit_code == 2 and "make setup" in res.output


def test_fetch_extracts_only_the_converter_atomically(tmp_path, monkeypatch):
    """fetch_converter on an sdist laid out like llama-cpp-python's (built from the real converter)."""
    real = llamacpp.require_converter()
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    with tarfile.open(sdist, "w:gz") as tf:
        for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py"):
            tf.add(real / name, prefix + name)
        (tmp_path / "big.cpp").write_text("// not needed")
        tf.add(tmp_path / "big.cpp", prefix + "src/big.cpp")
    monkeypatch.setenv("MLX_PIPELINE_CACHE", str(tmp_path / "cache"))
    dest = llamacpp.fetch_converter(sdist)
    assert dest == tmp_path / "cache" / f"llama.cpp-{llamacpp.VERSION}"
    assert sorted(p.name for p in dest.iterdir()) == [
        "VERSION", "conversion", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py"]
    assert (dest / "conversion" / "granite.py").read_bytes() == (real / "conversion" / "granite.py").read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [dest.name]  # no temporary left
    assert "GraniteMoeHybridForCausalLM" in llamacpp.converter_architectures()  # read from the new cache
    assert llamacpp.main(["where"]) == 0

    shutil.rmtree(dest)
    bad = tmp_path / "other.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        tf.add(tmp_path / "big.cpp", "pkg/big.cpp")
    with pytest.raises(PipelineError, match="not a llama-cpp-python sdist"):
        llamacpp.fetch_converter(bad)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-extracted


def test_converter_error_shows_its_output_and_leaves_no_file(tmp_path, tiny_hf_model):
    from safetensors.numpy import load_file, save_file

    cfg = make_run(tmp_path, tiny_hf_model("llama"))
    weights = tmp_path / "t" / "hf" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mystery.weight"] = np.zeros((4, 4), np.float32)  # valid file, unmappable name
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rerecord(weights.parent)
    with pytest.raises(PipelineError,
                       match=r"(?s)llama.cpp's converter failed on .*hf \(exit 1\). Its last lines:\n.*mystery"):
        convert_to_gguf(cfg)
    out = tmp_path / "t" / "gguf"
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*")) and not (out / "manifest.json").exists()


def test_native_file_of_a_fuse_that_lost_the_adapter_is_left_out(export_runs):
    """gguf.native on a QLoRA run fused --de-quantize: the --no-dequantize fuse behind Q4_1-native
    rounds a 1000x smaller adapter away (survival lost), so no such file is exported; the native
    training base + LoRA pair, which keeps the adapter apart, still is."""
    from export_fixtures import copy_run as copy_trained
    from export_fixtures import make_cfg as trained_cfg
    from export_fixtures import shrink_adapter
    from pipeline.phases.p07_fuse_lora import fuse

    root = export_runs.trained("llama")
    shrink_adapter(copy_trained(root, "lost-native"))
    cfg = trained_cfg(root, run="lost-native", fuse__dequantize=True, gguf__native=True, gguf__adapter_gguf=True,
                      **{"gguf.quantizations": ["Q8_0"]})
    fuse(cfg)
    result = convert_to_gguf(cfg)
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert "Q4_1-native" not in result.files and not (result.path / "lost-native-Q4_1-native.gguf").exists()
    assert manifest["native"]["source"].endswith("fused-native")
    assert "most of the fine-tune was lost" in manifest["native"]["skipped"]
    assert manifest["outputs"]["files"]["Q4_1-native-base"]["kind"] == "native-base"
