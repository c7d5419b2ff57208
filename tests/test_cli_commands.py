"""Every command, as the user types it: `--help` starts with examples whose flags exist, each
numbered script shows its own usage line, and `python -m pipeline.cli` runs (also through the
OpenBLAS re-exec)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.runtime import OPENBLAS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.name: p for p in ROOT.glob("scripts/phase*/[0-9][0-9]_*.py")}
# script -> command (the table of the phase map: every phase has exactly one script)
SCRIPT_COMMANDS = {
    "01_prepare_data.py": "data", "02_fetch_base_model.py": "base", "03_quantize_base_model.py": "quantize",
    "04_train_lora.py": "train", "05_evaluate.py": "eval", "06_generate.py": "generate", "07_fuse_lora.py": "fuse",
    "08_convert_to_hf.py": "hf", "09_convert_to_gguf.py": "gguf", "10_verify_gguf.py": "verify",
    "11_install_model.py": "install",
}


def _flags(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


# Commands that take paths, not a config (not in cli.COMMANDS) -> their arguments in the usage line.
PATH_COMMANDS = {"inspect": " PATH [PATH2]"}


def test_every_script_is_in_the_table():
    assert sorted(SCRIPTS) == sorted(SCRIPT_COMMANDS)
    assert set(SCRIPT_COMMANDS.values()) | {"serve", "sweep", "report"} == set(cli.COMMANDS)
    assert set(cli.COMMANDS) | set(PATH_COMMANDS) == set(cli.EXAMPLES) == set(cli.main.commands)


@pytest.mark.parametrize("name", sorted(cli.EXAMPLES))
def test_help_starts_with_examples_whose_flags_exist(name):
    out = CliRunner().invoke(cli.main, [name, "--help"], prog_name="mlx-pipeline").output
    head = out.splitlines()
    assert head[0] == f"Usage: mlx-pipeline {name} [OPTIONS]{PATH_COMMANDS.get(name, '')}", head[0]
    assert head[2].strip() == "Examples:", out[:400]
    examples = cli.EXAMPLES[name]
    assert 2 <= len([e for e in examples if not e.startswith(" ")]) <= 4
    for e in examples:
        assert e.strip() in out
    command = cli.main.commands[name]
    used = {f for e in examples for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", e)}
    assert used <= _flags(command), used - _flags(command)
    for e in examples:  # scripts named in examples exist
        for script in re.findall(r"scripts/\S+\.py", e):
            assert (ROOT / script).is_file(), script


@pytest.mark.parametrize("script", sorted(SCRIPT_COMMANDS))
def test_script_usage_shows_what_the_user_types(script):
    rel = SCRIPTS[script].relative_to(ROOT)
    proc = subprocess.run([sys.executable, str(rel), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"Usage: python {rel} [OPTIONS]", proc.stdout[:200]
    assert "Examples:" in proc.stdout.splitlines()[2]
    # the script's own docstring starts with a command that uses only existing flags
    doc = SCRIPTS[script].read_text().split('"""')[1]
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.splitlines()[0]))
    assert used <= _flags(cli.main.commands[SCRIPT_COMMANDS[script]]), used


@pytest.mark.skipif(not OPENBLAS.exists(), reason="the re-exec happens only where OpenBLAS is installed")
def test_python_m_pipeline_cli_survives_the_blas_reexec(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_PIPELINE_NO_REEXEC")}
    for args, expect in ((["--help"], "install"), (["fuse", "--help"], "--base-model")):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, env=env)
        assert proc.returncode == 0 and "attempted relative import" not in proc.stderr, proc.stderr
        assert expect in proc.stdout
    # the re-exec really happened: the child sees OpenBLAS preloaded
    code = ("from pipeline.runtime import ensure_fast_blas; import os, sys; ensure_fast_blas(); "
            "print(os.environ['LD_PRELOAD'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0 and str(OPENBLAS) in proc.stdout, proc.stderr


def test_top_level_help_lists_the_deploy_commands():
    out = CliRunner().invoke(cli.main, ["--help"], prog_name="mlx-pipeline").output
    for name in ("install", "serve"):
        assert re.search(rf"^\s+{name}\s", out, re.M), out


def test_scripts_run_from_a_python_without_the_dependencies(tmp_path):
    """The guides say `python3 scripts/...`: a python3 lacking mlx re-runs the script in .venv/."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    venv = ROOT / ".venv" / "bin" / "python"
    if not base.is_file() or not venv.is_file():
        pytest.skip("needs the base interpreter and the project's .venv (make setup)")
    if subprocess.run([str(base), "-c", "import mlx"], capture_output=True).returncode == 0:
        pytest.skip("the base interpreter has mlx itself")
    proc = subprocess.run([str(base), "scripts/phase5-convert-model-formats/08_convert_to_hf.py",
                           "--mlx-model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "ModuleNotFoundError" not in proc.stderr, proc.stderr
    assert ("--mlx-model" in proc.stderr and "no such folder" in proc.stderr
            and not (tmp_path / "hf").exists()), proc.stderr
