"""The commands our users' guides print, run as scripts on the plain paths of a finished run.

    07_fuse_lora.py --base-model M --adapter-path A --output-dir O [--no-dequantize | --de-quantize]
    08_convert_to_hf.py --mlx-model O --output-dir H
    09_convert_to_gguf.py --hf-model H --output PREFIX --quantization Q4_K_M

Each must exit 0, print its sizes, and hand the next one something it loads; the same checks as
the run form apply (another base's adapter, an output over an input or over the user's files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FUSE = ROOT / "scripts/phase4-fine-tune-model/07_fuse_lora.py"
HF = ROOT / "scripts/phase5-convert-model-formats/08_convert_to_hf.py"
GGUF = ROOT / "scripts/phase5-convert-model-formats/09_convert_to_gguf.py"
# The developer's config variables must not reach the scripts.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("TEST_MODE", "RUN", "MODELS_DIR", "DEQUANTIZE", "QUANTIZE", "QUANTS", "IMATRIX")}


def run(script: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def trained(export_runs) -> Path:
    """A finished tiny llama QLoRA run (base/, base-quantized/, adapters/, data/)."""
    return export_runs.trained("llama") / "t"


@pytest.fixture(scope="module")
def chain(trained, tmp_path_factory) -> dict:
    """The three guide commands, in order, on plain paths (both fuse modes)."""
    out = tmp_path_factory.mktemp("guide")
    logs = {}
    logs["fuse_q"] = ok(run(FUSE, "--base-model", trained / "base-quantized", "--adapter-path", trained / "adapters",
                            "--output-dir", out / "fused-q", "--no-dequantize"))
    logs["fuse_dq"] = ok(run(FUSE, "--base-model", trained / "base-quantized", "--adapter-path", trained / "adapters",
                             "--save-path", out / "fused-dq", "--de-quantize"))
    logs["hf"] = ok(run(HF, "--mlx-model", out / "fused-dq", "--output-dir", out / "hf"))
    logs["gguf"] = ok(run(GGUF, "--hf-model", out / "hf", "--output", out / "gguf" / "tiny", "--quantization",
                          "Q8_0,F16"))
    return {"out": out, "logs": logs}


def test_fuse_path_form_prints_sizes_and_survival(chain):
    out, logs = chain["out"], chain["logs"]
    for mode, folder in (("fuse_q", "fused-q"), ("fuse_dq", "fused-dq")):
        assert "size: training base" in logs[mode] and "adapter survival" in logs[mode].lower(), logs[mode]
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert manifest["phase"] == "07_fuse_lora" and manifest["dequantized"] == (mode == "fuse_dq")
        assert manifest["survival"]["end_to_end"]["rows"] > 0  # the adapter's own run's validation rows
    q = json.loads((out / "fused-q" / "config.json").read_text())
    assert q["quantization"]["bits"] == 4
    assert "quantization" not in json.loads((out / "fused-dq" / "config.json").read_text())


def test_hf_path_form_loads_in_transformers_like_mlx(chain):
    """08's output is what transformers computes: its logits match the fused MLX model's."""
    import mlx.core as mx
    import torch
    from mlx_lm.utils import load
    from transformers import AutoModelForCausalLM

    out = chain["out"]
    assert "Hugging Face model ready" in chain["logs"]["hf"]
    ids = [1, 504, 3458, 282, 4649, 314, 2]
    model, _ = load(str(out / "fused-dq"))
    mlx_logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    hf = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(mlx_logits - hf_logits).max() < 0.05 * np.abs(mlx_logits).max()


def _gguf_vs_mlx(gguf: Path, mlx_dir: Path) -> tuple[float, float]:
    """(max |logit difference| / the logits' spread, top-1 agreement) of llama.cpp vs MLX. A tiny
    random model's softmax is near-uniform, so a KL would say little: the logits are compared."""
    import llama_cpp
    import mlx.core as mx
    from mlx_lm.utils import load

    from pipeline.modeling import cast_floats

    ids = [1, 504, 3458, 282, 4649, 314, 2, 17, 33, 280]
    model, _ = load(str(mlx_dir))
    cast_floats(model, mx.float32)
    p = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_ctx=64, verbose=False)
    llm.eval(ids)
    q = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    spread = (p.max(-1) - p.min(-1)).mean()
    assert spread > 1.0, spread
    return float(np.abs(p - q).max() / spread), float((p.argmax(-1) == q.argmax(-1)).mean())


def test_gguf_path_form_writes_prefix_files(chain):
    out = chain["out"]
    files = sorted(p.name for p in (out / "gguf").iterdir())
    assert files == ["tiny-F16.gguf", "tiny-Q8_0.gguf", "tiny.manifest.json"], files
    manifest = json.loads((out / "gguf" / "tiny.manifest.json").read_text())
    assert set(manifest["outputs"]["files"]) == {"Q8_0", "F16"}
    assert "bits/weight" in chain["logs"]["gguf"]
    error, top1 = _gguf_vs_mlx(out / "gguf" / "tiny-F16.gguf", out / "fused-dq")
    assert error < 5e-3 and top1 == 1.0, (error, top1)


def test_gguf_path_form_accepts_a_quantized_mlx_folder(chain):
    """An MLX 4-bit fused folder goes through 08 in a temporary folder; only Q8_0 is kept."""
    out = chain["out"]
    log = ok(run(GGUF, "--hf-model", out / "fused-q", "--output", out / "from-mlx" / "q", "--quantization", "Q8_0"))
    assert "is an MLX model folder" in log
    assert sorted(p.name for p in (out / "from-mlx").iterdir()) == ["q-Q8_0.gguf", "q.manifest.json"]
    error, top1 = _gguf_vs_mlx(out / "from-mlx" / "q-Q8_0.gguf", out / "fused-q")
    assert error < 5e-2 and top1 >= 0.9, (error, top1)


def test_gguf_path_form_keeps_the_unquantized_file_when_asked(chain):
    out = chain["out"]
    ok(run(GGUF, "--hf-model", out / "hf", "--output", out / "keep" / "k", "--quantization", "Q8_0",
           "--keep-unquantized", "true"))
    assert sorted(p.name for p in (out / "keep").iterdir()) == ["k-F16.gguf", "k-Q8_0.gguf", "k.manifest.json"]
    bad = run(GGUF, "--hf-model", out / "hf", "--output", out / "keep" / "k", "--keep-unquantized", "maybe")
    assert bad.returncode == 2 and "'maybe' is not one of 'auto', 'true', 'false'" in bad.stderr, bad.stderr


def test_path_form_refuses_another_bases_adapter(trained, export_runs, tmp_path):
    other = export_runs.trained("granite") / "t"
    err = refused(run(FUSE, "--base-model", trained / "base-quantized", "--adapter-path", other / "adapters",
                      "--output-dir", tmp_path / "fused"), "was trained on", "wrong weights", "--base-model")
    assert not (tmp_path / "fused").exists()
    assert not any(p.name.startswith(".fused") for p in tmp_path.iterdir()), err


def test_path_form_never_replaces_inputs_or_foreign_folders(trained, tmp_path):
    base_files = sorted(p.name for p in (trained / "base-quantized").iterdir())
    refused(run(FUSE, "--base-model", trained / "base-quantized", "--adapter-path", trained / "adapters",
                "--output-dir", trained / "base-quantized"), "inside")
    assert sorted(p.name for p in (trained / "base-quantized").iterdir()) == base_files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(run(HF, "--mlx-model", trained / "base-quantized", "--output-dir", mine), "did not write",
            "Nothing was changed")
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x-Q8_0.gguf").write_bytes(b"user's own file")
    refused(run(GGUF, "--hf-model", trained / "base", "--output", tmp_path / "g" / "x", "--quantization", "Q8_0"),
            "were not written by this command")
    assert (tmp_path / "g" / "x-Q8_0.gguf").read_bytes() == b"user's own file"


def test_path_form_flag_errors(trained, tmp_path):
    refused(run(FUSE, "--base-model", trained / "base-quantized", "--output-dir", tmp_path / "o"),
            "--adapter-path")
    refused(run(FUSE, "--base-model", tmp_path / "nope", "--adapter-path", trained / "adapters",
                "--output-dir", tmp_path / "o"), "no such folder")
    refused(run(FUSE, "--base-model", trained / "base-quantized", "--adapter-path", trained / "data",
                "--output-dir", tmp_path / "o"), "adapters.safetensors")
    refused(run(GGUF, "--hf-model", trained / "base", "--output", tmp_path / "m.gguf"), "give a prefix")
    refused(run(GGUF, "--hf-model", trained / "base", "--output", tmp_path / "m", "--quantization", "Q9"),
            "Q9", "choose from")
    assert not (tmp_path / "o").exists()
