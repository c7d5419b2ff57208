"""llama.cpp aborts (GGML_ASSERT -> SIGABRT) become one PipelineError, never our process's death.

The file that aborts is real: a tiny llama F16 GGUF from llama.cpp's converter whose config says
2 experts are used of none (`expert_used_count` 2, no `expert_count`), the contradiction
transformers' defaults left in a Granite 4.0 H config. llama.cpp's loader and its quantizer both
stop at `GGML_ASSERT(n_expert_used_max <= hparams.n_expert)`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_fixtures import converted_run, make_run, rewrite_gguf
from pipeline import llamacpp
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_path

ROOT = Path(__file__).resolve().parents[1]
ASSERT = "GGML_ASSERT(n_expert_used_max <= hparams.n_expert) failed"
# What gdb's and glibc's backtraces print; none of it may reach the user.
BACKTRACE = ("#0 ", "#1 ", "Inferior", "backtrace", "libggml", "Aborted")


def with_experts_used(src: Path, dst: Path, used: int = 2) -> Path:
    """Copy a GGUF adding `<arch>.expert_used_count` without experts: llama.cpp asserts on it."""
    return rewrite_gguf(src, dst, {}, add_uint32={"{arch}.expert_used_count": used})


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory, tiny_hf_model) -> dict:
    """{"good": tiny llama F16 (the session's converted run, shared with 09/10's tests), "bad": a copy
    claiming 2 experts used of 0}."""
    _, result = converted_run(tmp_path_factory, tiny_hf_model, "llama")
    good = result.files["F16"]
    return {"good": good, "bad": with_experts_used(good, tmp_path_factory.mktemp("abort") / "bad-F16.gguf")}


def assert_one_clear_error(message: str, *names: str) -> None:
    assert ASSERT in message, message
    assert "killed by SIGABRT" in message
    for name in names:
        assert name in message, message
    assert not any(b in message for b in BACKTRACE), message


def test_quantize_abort_is_one_error_and_leaves_nothing(ggufs, tmp_path):
    final = tmp_path / "bad-Q8_0.gguf"
    with pytest.raises(PipelineError) as e, atomic_path(final) as tmp:  # as 09 writes each file
        llamacpp.quantize(ggufs["bad"], tmp, "Q8_0", threads=2)
    assert_one_clear_error(str(e.value), f"quantizing {ggufs['bad']} to Q8_0")
    assert list(tmp_path.iterdir()) == []
    llamacpp.quantize(ggufs["good"], final, "Q8_0", threads=2)  # the same call on a sound file works
    assert llamacpp.n_params(final) == llamacpp.n_params(ggufs["good"])


def test_quantize_tool_abort_is_one_error(ggufs, tmp_path):
    """llama-quantize (the built tool, used with an importance matrix) through the same translation."""
    try:
        tool = llamacpp.tool("llama-quantize")
    except PipelineError:
        pytest.skip("llama-quantize is not built (`python -m pipeline.llamacpp build-tools`)")
    with pytest.raises(PipelineError) as e:
        llamacpp.run_child([str(tool), str(ggufs["bad"]), str(tmp_path / "q.gguf"), "Q8_0", "2"], "quantizing it")
    assert_one_clear_error(str(e.value), "quantizing it")


def test_open_gguf_abort_is_one_error(ggufs):
    with pytest.raises(PipelineError) as e:
        llamacpp.open_gguf(ggufs["bad"], n_ctx=64)
    assert_one_clear_error(str(e.value), f"loading {ggufs['bad']}")
    llm = llamacpp.open_gguf(ggufs["good"], n_ctx=64)  # we are alive, and a sound file still opens
    assert llm.n_ctx() >= 64 and llm.n_vocab() > 0


def test_open_gguf_validates_the_lora_header_before_llama_cpp(ggufs, tmp_path):
    lora = tmp_path / "adapter-LoRA-F16.gguf"
    lora.write_bytes(ggufs["good"].read_bytes()[:5000])  # a download cut short
    with pytest.raises(PipelineError, match=rf"{lora} is not a valid LoRA GGUF, not loaded"):
        llamacpp.open_gguf(ggufs["good"], n_ctx=64, lora=lora)


def test_probes_ahead_report_an_abort_when_its_file_is_opened(ggufs, tmp_path, monkeypatch):
    """10 verify proves the loads in children while MLX computes its reference (probes_ahead): the
    abort found there is the same one error, raised when that file is opened; a sound file then
    opens with no second child; a file whose header fails check_gguf is not given to llama.cpp."""
    from concurrent.futures import wait

    bad = Path(shutil.copy(ggufs["bad"], tmp_path / "bad-F16.gguf"))  # copies: never probed before
    good = Path(shutil.copy(ggufs["good"], tmp_path / "good-F16.gguf"))
    cut = tmp_path / "cut-F16.gguf"
    cut.write_bytes(good.read_bytes()[:5000])
    keys = {f: llamacpp._probe_key(f, None) for f in (bad, good, cut)}
    with llamacpp.probes_ahead([(bad, None), (good, None), (cut, None), (tmp_path / "gone.gguf", None)]):
        wait([llamacpp._AHEAD[k] for k in keys.values()])
    assert llamacpp._AHEAD[keys[cut]].result() is False
    with pytest.raises(PipelineError) as e:
        llamacpp._AHEAD[keys[bad]].result()
    assert_one_clear_error(str(e.value), f"loading {bad}")

    def no_child(*args, **kwargs):
        raise AssertionError(f"a second probe: {args}")

    monkeypatch.setattr(llamacpp, "run_child", no_child)
    with pytest.raises(PipelineError) as e:
        llamacpp.open_gguf(bad, n_ctx=64)
    assert_one_clear_error(str(e.value), f"loading {bad}")
    assert llamacpp.open_gguf(good, n_ctx=64).n_vocab() > 0
    with pytest.raises(PipelineError, match=rf"{cut} is not a valid GGUF, not loaded"):
        llamacpp.open_gguf(cut, n_ctx=64)


def test_children_print_no_backtrace(ggufs):
    """GGML_NO_BACKTRACE (read by ggml_abort) keeps gdb off: the child's raw output has only the assert."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.llamacpp", "probe", str(ggufs["bad"])], cwd=ROOT,
                          capture_output=True, text=True, env=llamacpp.child_env(), check=False)
    assert proc.returncode < 0 and ASSERT in proc.stderr
    assert "Inferior" not in proc.stderr and "#1 " not in proc.stderr


def test_n_params_reads_the_header_as_llama_cpp_counts(ggufs):
    import llama_cpp

    with llamacpp.captured_log():
        model = llama_cpp.llama_model_load_from_file(str(ggufs["good"]).encode(),
                                                     llama_cpp.llama_model_default_params())
    try:
        expected = int(llama_cpp.llama_model_n_params(model))
    finally:
        llama_cpp.llama_model_free(model)
    assert llamacpp.n_params(ggufs["good"]) == expected > 0
    assert llamacpp.n_params(ggufs["bad"]) == expected  # counted without loading: no abort


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (an abort in-process would take pytest with it), without
    GGML_NO_BACKTRACE: the pipeline sets it for its own children."""
    env = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "TEST_MODE": "", "QUANTS": ""}, check=False)


def test_cli_gguf_on_a_config_llama_cpp_rejects(tmp_path, tiny_hf_model):
    """The issue's case through `mlx-pipeline gguf`: the converter writes what the config says, the
    quantizer aborts; one error, exit 2, no backtrace, no Q8_0 file nor temporary, no manifest."""
    model = tmp_path / "src"
    shutil.copytree(tiny_hf_model("llama"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 2}))
    make_run(tmp_path / "models", model)
    proc = cli("gguf", "--run", "t", "--models-dir", str(tmp_path / "models"), "--quantization", "Q8_0",
               "--threads", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr
    assert_one_clear_error(errors[0] + proc.stdout, "t-F16.gguf to Q8_0")
    out = tmp_path / "models" / "t" / "gguf"
    assert not (out / "t-Q8_0.gguf").exists() and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_cli_verify_names_the_file_that_aborts(tmp_path, tiny_hf_model, ggufs):
    """`mlx-pipeline verify` on a run whose gguf/ holds the file: that file fails, the sound one is
    measured, the report is written, our process exits 2 by itself."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    cfg = make_run(tmp_path, tiny_hf_model("llama"), **{"gguf.quantizations": ["F16"]})
    convert_to_gguf(cfg)
    gguf = tmp_path / "t" / "gguf"
    with_experts_used(gguf / "t-F16.gguf", gguf / "t-experts.gguf")
    proc = cli("verify", "--run", "t", "--models-dir", str(tmp_path), "--max-rows", "2", "--max-samples", "0")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert ASSERT in output and "t-experts.gguf" in output
    assert not any(b in output for b in BACKTRACE), output
    report = json.loads((tmp_path / "t" / "verify" / "report.json").read_text())
    assert not report["passed"] and any("t-experts.gguf" in f and ASSERT in f for f in report["failures"])


def test_imatrix_abort_is_one_error_and_leaves_nothing(ggufs, tmp_path):
    from pipeline import imatrix

    try:
        llamacpp.tool("llama-imatrix")
    except PipelineError:
        pytest.skip("llama-imatrix is not built (`python -m pipeline.llamacpp build-tools`)")
    text = tmp_path / "calibration.txt"
    text.write_text("Ken wants 2 red lamps shipped to Oslo.\n" * 200)
    out = tmp_path / "imatrix" / "imatrix.gguf"
    with pytest.raises(PipelineError) as e:
        imatrix.compute_imatrix(ggufs["bad"], text, out, tokens=2000, chunk_tokens=64, max_chunks=2, threads=2)
    assert_one_clear_error(str(e.value), f"computing the importance matrix of {ggufs['bad']}")
    assert list(out.parent.iterdir()) == []
