"""11 install: the choice from 10 verify's report, LM Studio's folder layout, the Ollama Modelfile,
re-install, dry run, uninstall, and every refusal leaving nothing half-written.

A tiny llama run is converted and verified for real (llama.cpp); LM Studio's models folder is a
temporary one (LMSTUDIO_MODELS_DIR / install.lmstudio_dir).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gguf_fixtures import converted_run, copy_run
from pipeline.data.sample_task import SYSTEM, generate_rows
from pipeline.errors import MissingInputError, PipelineError
from pipeline.export_choice import _best, _pick
from pipeline.fsio import write_jsonl
from pipeline.phases.p10_verify_gguf import verify_gguf
from pipeline.phases.p11_install_model import install_model
from test_ollama_template import go_render as go_render  # the Go renderer fixture (an explicit re-export)

# The demo's verify table (README), as report rows: the rules must pick as a user would.
DEMO = [("F16", 270.9, 8.4e-6, 100), ("Q8_0", 144.8, 7.0e-3, 100), ("Q5_K_M-imatrix", 112.1, 5.3e-2, 100),
        ("Q5_K_M", 112.1, 9.9e-2, 100), ("Q4_K_M-imatrix", 105.5, 0.126, 96.7), ("Q4_K_M", 105.5, 0.133, 93.3),
        ("Q4_1-native", 86.0, 1.39, 0.0)]


def demo_rows():
    # An imatrix file is 256 bytes larger than the plain one (its metadata), as measured on the demo.
    rows = [{"file": f"demo-{t}.gguf", "type": t, "size_bytes": int(mb * 1e6) + 256 * t.endswith("-imatrix"),
             "kl": kl, "metric": {"json": m}} for t, mb, kl, m in DEMO]
    rows.append({"file": "demo-adapter-base-F16.gguf + demo-adapter-LoRA-F16.gguf", "type": "F16 + LoRA",
                 "size_bytes": int(272.2e6), "kl": 3.7e-6, "metric": {"json": 100}})
    return rows, {"file": "fused/ (MLX)", "metric": {"json": 100.0}}


def test_default_choice_is_the_smallest_file_that_keeps_the_task():
    rows, ref = demo_rows()
    row, reason = _best(rows, ref, "json", max_drop=2.0, max_kl=0.2)
    assert row["file"] == "demo-Q5_K_M-imatrix.gguf"  # 256 bytes more than Q5_K_M: the same size, lower KL
    assert "Q4_K_M" in reason and "Q4_1-NATIVE KL 1.39" in reason  # says what was left out, and why
    row, _ = _best(rows, ref, "json", max_drop=5.0, max_kl=0.2)
    assert row["file"] == "demo-Q4_K_M-imatrix.gguf"
    row, _ = _best(rows, ref, "json", max_drop=2.0, max_kl=0.01)
    assert row["file"] == "demo-Q8_0.gguf"
    with pytest.raises(PipelineError, match="No verified export"):
        _best(rows, ref, "json", max_drop=2.0, max_kl=1e-7)
    assert _pick(rows, "q4_k_m-IMATRIX", None)["file"] == "demo-Q4_K_M-imatrix.gguf"
    assert _pick(rows, "F16+LoRA", None)["type"] == "F16 + LoRA"
    assert _pick(rows, None, "/x/demo-Q8_0.gguf")["file"] == "demo-Q8_0.gguf"
    with pytest.raises(PipelineError, match=r"--type Q3_K.*Q8_0 \(demo-Q8_0.gguf\)"):
        _pick(rows, "Q3_K", None)


@pytest.fixture(scope="module")
def verified(tmp_path_factory, tiny_hf_model):
    """A verified tiny llama run (F16, Q8_0, Q5_K_M, Q4_K_M) whose training data used one system prompt."""
    src, _ = converted_run(tmp_path_factory, tiny_hf_model, "llama")
    root = tmp_path_factory.mktemp("install")
    cfg = copy_run(src, root)
    write_jsonl(Path(root) / cfg.run / "data" / "train.jsonl", generate_rows(8, seed=2))
    verify_gguf(cfg)
    return cfg


def _cfg(verified, tmp_path, **keys):
    from gguf_fixtures import make_cfg

    run = Path(tmp_path) / "models"
    if not run.exists():
        shutil.copytree(Path(verified.models_dir), run, copy_function=os.link)  # the files, not copies
    keys.setdefault("install__lmstudio_dir", str(tmp_path / "lmstudio"))
    keys.setdefault("install__max_kl", 1.0)
    return make_cfg(run, verified.run, **keys)


def test_install_places_lmstudio_file_and_writes_modelfile(verified, tmp_path):
    cfg = _cfg(verified, tmp_path)
    result = install_model(cfg)
    report = json.loads((Path(cfg.models_dir) / cfg.run / "verify" / "report.json").read_text())
    files = [r for r in report["models"] if r["file"].endswith(".gguf")]  # tiny model: all within the limits
    least = min(r["size_bytes"] for r in files)
    smallest = min((r for r in files if r["size_bytes"] <= 1.01 * least), key=lambda r: r["kl"])
    assert result.choice.gguf.name == smallest["file"]
    lms = tmp_path / "lmstudio" / "mlx-pipeline" / f"{cfg.run}-GGUF" / smallest["file"]
    assert lms.is_file() and lms.stat().st_ino == result.choice.gguf.stat().st_ino  # a hard link, no copy
    assert sorted(p.name for p in lms.parent.iterdir()) == [smallest["file"]]

    modelfile = result.modelfile.read_text()
    folder = result.modelfile.parent
    assert f"FROM ./{smallest['file']}\n" in modelfile and (folder / smallest["file"]).is_file()
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f'SYSTEM """{SYSTEM}"""' in modelfile
    assert any(c.startswith("ollama create t -f ") for c in result.commands)
    assert any(c.startswith("llama-server -m ") and "--jinja" in c for c in result.commands)
    manifest = json.loads((folder.parent / "manifest.json").read_text())
    assert {e["target"] for e in manifest["outputs"]["installed"]} == {"lmstudio", "ollama"}


def test_reinstall_replaces_and_uninstall_removes_only_ours(verified, tmp_path):
    cfg = _cfg(verified, tmp_path)
    first = install_model(cfg)
    other = tmp_path / "lmstudio" / "someone" / "their-GGUF" / "theirs.gguf"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"not ours")
    second = install_model(cfg, type_name="F16")
    folder = tmp_path / "lmstudio" / "mlx-pipeline" / f"{cfg.run}-GGUF"
    assert sorted(p.name for p in folder.iterdir()) == [second.choice.gguf.name] != [first.choice.gguf.name]
    assert second.removed and all(first.choice.gguf.name in r for r in second.removed)
    assert f"FROM ./{second.choice.gguf.name}" in second.modelfile.read_text()

    before = sorted(str(p) for p in tmp_path.rglob("*"))
    install_model(cfg, type_name="Q4_K_M", dry_run=True)
    install_model(cfg, uninstall=True, dry_run=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # dry runs change nothing

    install_model(cfg, uninstall=True)
    assert not (tmp_path / "lmstudio" / "mlx-pipeline").exists()
    assert other.read_bytes() == b"not ours"
    assert not (Path(cfg.models_dir) / cfg.run / "install").exists()
    assert result_files_intact(cfg)
    with pytest.raises(MissingInputError, match="Nothing to uninstall"):
        install_model(cfg, uninstall=True)


def result_files_intact(cfg) -> bool:
    from pipeline.manifest import read_manifest

    read_manifest(Path(cfg.models_dir) / cfg.run / "gguf", "gguf")  # re-checks every GGUF's sha256
    return True


def test_copy_across_filesystems(verified, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    root = Path(shm) / f"lmstudio-test-{os.getpid()}"
    try:
        result = install_model(_cfg(verified, tmp_path, install__lmstudio_dir=str(root), install__targets="lmstudio"))
        placed = next(root.rglob("*.gguf"))
        assert placed.read_bytes() == result.choice.gguf.read_bytes()
        assert result.installed[0]["how"] == "copy"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_refusals_leave_nothing(verified, tmp_path):
    cfg = _cfg(verified, tmp_path)
    run = Path(cfg.models_dir) / cfg.run
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PipelineError, match="not writable.*LMSTUDIO_MODELS_DIR"):
        install_model(_cfg(verified, tmp_path, install__lmstudio_dir=str(blocker / "models")))
    with pytest.raises(PipelineError, match=r"--type Q2_K: no such verified export\. Verified: F16"):
        install_model(cfg, type_name="Q2_K")
    assert not (run / "install").exists()

    report_path = run / "verify" / "report.json"
    report = json.loads(report_path.read_text())
    q8 = next(r["file"] for r in report["models"] if r["file"].endswith("-Q8_0.gguf"))
    report["failures"] = [f"{q8}: its chat template differs from the trained model's."]
    report_path.unlink()  # a hard link to the shared run: write a file of our own
    report_path.write_text(json.dumps(report))
    with pytest.raises(PipelineError, match="failed 10 verify.*--force"):
        install_model(cfg, type_name="Q8_0")
    assert not (run / "install").exists() and not (tmp_path / "lmstudio").exists()
    assert "FAILED verify" in install_model(cfg, type_name="Q8_0", force=True).choice.reason

    report_path.unlink()
    with pytest.raises(MissingInputError, match="make verify"):
        install_model(cfg)


@pytest.mark.slow
def test_make_install_on_a_trained_smollm2(shipped_run, go_render, tmp_path):
    """`make install` on a real fine-tune: the rules' choice lands in LM Studio's layout, and the
    Modelfile's TEMPLATE, rendered by Go as Ollama would (SYSTEM prepended), gives exactly the
    prompt the GGUF's own Jinja template gives for the test chats."""
    import subprocess

    from pipeline.llamacpp import gguf_chat_metadata
    from pipeline.ollama_template import ollama_data
    from test_ollama_template import jinja_prompt

    cfg = shipped_run.cfg
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_MODE", "RUN", "MODELS_DIR", "TYPE")}
    env["LMSTUDIO_MODELS_DIR"] = str(tmp_path / "lmstudio")
    proc = subprocess.run(["make", "install", f"MODELS_DIR={cfg.models_dir}", f"RUN={cfg.run}"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = [r for r in shipped_run.report["models"] if not r["file"].endswith("(MLX)")]
    ref = next(r for r in shipped_run.report["models"] if r["file"].endswith("(MLX)"))
    expected, _ = _best(rows, ref, shipped_run.report["primary_metric"], 2.0, 0.2)
    assert f"chose {expected['file'].split(' + ')[0]}" in proc.stdout
    merged = expected if " + " not in expected["file"] else \
        _best([r for r in rows if " + " not in r["file"]], ref, shipped_run.report["primary_metric"], 2.0, 0.2)[0]
    placed = sorted((tmp_path / "lmstudio" / "mlx-pipeline" / f"{cfg.run}-GGUF").iterdir())
    assert [p.name for p in placed] == [merged["file"]]

    folder = shipped_run.root / "install" / "ollama"
    text = (folder / "Modelfile").read_text()
    assert f'SYSTEM """{SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    meta = gguf_chat_metadata(folder / expected["file"].split(" + ")[0])
    for row in shipped_run.answered_rows()[:6]:
        user_only = [m for m in row["messages"] if m["role"] != "system"][:-1]  # what a client sends
        seen = [{"role": "system", "content": SYSTEM}] + user_only  # Ollama prepends SYSTEM
        assert go_render(template, ollama_data(seen)) == jinja_prompt(meta["template"], meta["special_tokens"],
                                                                     meta["add_bos"], seen)
