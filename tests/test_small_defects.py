"""Defects a new user found (issue 10, item 6), each held by a test that failed before its fix.

01's byte-order mark and overlong-row naming are in test_p01_prepare_data.py.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from gguf_fixtures import make_cfg, make_run, rerecord
from pipeline.errors import UntrustedFileError
from pipeline.fsio import atomic_path

ROOT = Path(__file__).resolve().parents[1]
# Writers that append an extension to a name lacking it, so their temporaries must keep it.
APPENDS_EXTENSION = {".safetensors": "MLX's save_safetensors", ".png": "matplotlib picks the format from it"}


def test_08_validates_safetensors_headers_before_mlx_reads_them(tmp_path, tiny_hf_model):
    """fused/ whose weights have 8 bytes past the last tensor (MLX reads it without a word), recorded
    in its manifest as if 07 had written it: 08 names the file and writes nothing."""
    from pipeline.phases.p08_convert_to_hf import convert_to_hf

    cfg = make_run(tmp_path, tiny_hf_model("llama"), hf=False)
    fused = tmp_path / "t" / "fused"
    weights = fused / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 8)
    rerecord(fused)
    with pytest.raises(UntrustedFileError, match=rf"{weights}.*tensors cover \d+ bytes but the data buffer"):
        convert_to_hf(cfg)
    assert not (tmp_path / "t" / "hf").exists()


def test_temporaries_end_in_tmp_so_no_gguf_glob_finds_them(tmp_path):
    final = tmp_path / "run-Q4_K_M.gguf"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"GGUF half a file")
        assert tmp.name.endswith(".tmp") and tmp.parent == tmp_path
        assert list(tmp_path.glob("*.gguf")) == []
    assert list(tmp_path.glob("*.gguf")) == [final]


def test_no_writer_keeps_an_extension_it_does_not_append():
    """Every `atomic_path(..., suffix=...)` in the package names an extension its writer appends."""
    found = []
    for f in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "atomic_path":
                for kw in node.keywords:
                    if kw.arg == "suffix":
                        value = kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
                        found.append((f"{f.relative_to(ROOT)}:{node.lineno}", value))
    assert found and all(value in APPENDS_EXTENSION for _, value in found), found


def test_every_file_02_writes_is_readable_by_all(tmp_path, tiny_hf_model):
    """transformers wrote the tiny model's weights 0600 (mkstemp). Every file 02 writes gets a plain
    file's mode (0644 under the usual umask), folders too; weights 02 hard-links are the source's
    own files and keep the source's mode, which 02 never changes."""
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    source = tiny_hf_model("llama")
    weights = source / "model.safetensors"
    before = stat.S_IMODE(weights.stat().st_mode)
    os.chmod(weights, 0o600)  # what save_pretrained leaves, whatever ran before
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        cfg = make_cfg(tmp_path, **{"model.source": str(source)})
        out = fetch_base_model(cfg).path
        written = [out, *out.rglob("*")]
        assert len(written) > 4 and out / "model.safetensors" in written
        linked = {p for p in written if p.is_file() and p.stat().st_ino == weights.stat().st_ino}
        modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
        expected = {str(p.relative_to(tmp_path)): oct(0o600 if p in linked else
                                                      (0o777 if p.is_dir() else 0o666) & ~umask) for p in written}
        assert modes == expected
        assert stat.S_IMODE(weights.stat().st_mode) == 0o600  # the user's file untouched
    finally:
        os.chmod(weights, before)  # the shared fixture as it was


def test_executables_keep_their_x_bit(tmp_path):
    """The modes fix must not strip llama.cpp's tools (build-tools moves them into place with atomic_path)."""
    with atomic_path(tmp_path / "tools") as tmp:
        tmp.mkdir()
        (tmp / "llama-quantize").write_bytes(b"\x7fELF")
        os.chmod(tmp / "llama-quantize", 0o700)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "tools" / "llama-quantize").stat().st_mode) == 0o777 & ~umask
