"""Disk and memory of the export (08 hf, 09 gguf) on tiny QLoRA-trained runs: real mlx-lm,
transformers and llama.cpp, no mocks.

hf/ shares fused/'s files when they hold exactly the export's tensors, and a later re-fuse cannot
change them through the shared inode; 09 can make its unquantized GGUF a working file and reports
the run folder's size; the streaming writer's dequantized row blocks equal a whole dequantization.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from export_fixtures import PROMPTS, copy_run, make_cfg, shrink_adapter
from pipeline import fsio, hf_export
from pipeline.fsio import disk_usage, hash_model_dir, link_or_copy
from pipeline.phases.p08_convert_to_hf import convert_to_hf


def _inodes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_ino for f in sorted(folder.glob("*.safetensors"))}


def test_hf_links_a_dequantized_fuse_and_a_refuse_leaves_it_intact(export_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.phases.p07_fuse_lora import fuse

    # A run of its own: the re-fuse below changes its adapter, which the shared fused runs must keep.
    root = export_runs.trained("llama")
    copy_run(root, "disk-links")
    fcfg = make_cfg(root, run="disk-links", fuse__dequantize=True)  # bf16, the export's default dtype
    fused = fuse(fcfg)
    run = fused.path.parent
    result = convert_to_hf(make_cfg(root, run=fcfg.run))
    hf = result.path
    assert _inodes(hf) == _inodes(fused.path) and _inodes(hf)  # the same files, no second copy
    manifest = json.loads((hf / "manifest.json").read_text())
    assert manifest["outputs"]["shards_from_fused"] == "hard-linked"
    # hf/'s hash reuses 07's sha256s of the very same files: it must equal a hash from scratch.
    recorded = json.loads((fused.path / "manifest.json").read_text())["outputs"]["file_sha256"]
    assert recorded == {f.name: fsio.sha256_file(f) for f in fused.path.glob("*.safetensors")}
    assert manifest["outputs"]["content_hash"] == hash_model_dir(hf)
    usage = disk_usage(run)
    assert usage["folders"]["hf"]["shared_bytes"] == result.size_bytes
    assert usage["folders"]["hf"]["bytes"] == sum(f.stat().st_size for f in hf.iterdir() if f.suffix != ".safetensors")

    # transformers loads the shared shards (mlx-lm marks them "format": "mlx") and computes the model
    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([tok.encode(PROMPTS[0])])).logits).all()

    # A re-fuse with another adapter writes new files (new inodes): hf/ keeps exactly what it exported.
    shrink_adapter(run, 0.5)
    refused = fuse(make_cfg(root, run=fcfg.run, fuse__dequantize=True))
    assert not set(_inodes(refused.path).values()) & set(_inodes(hf).values())
    assert hash_model_dir(hf) == manifest["outputs"]["content_hash"]
    assert hash_model_dir(refused.path) != manifest["outputs"]["content_hash"]
    # ... and 08 run again links the new fuse.
    assert _inodes(convert_to_hf(make_cfg(root, run=fcfg.run)).path) == _inodes(refused.path)


def test_hf_of_another_dtype_is_written_not_linked(export_runs):
    fcfg, fused = export_runs.fused("llama", dequantize=True)
    root = fused.path.parents[1]
    hf = convert_to_hf(make_cfg(root, run=fcfg.run, export__dtype="float32")).path
    assert not set(_inodes(hf).values()) & set(_inodes(fused.path).values())
    assert json.loads((hf / "manifest.json").read_text())["outputs"]["shards_from_fused"] is None


def test_dequantized_row_blocks_equal_a_whole_dequantization(export_runs, tmp_path, monkeypatch):
    """The writer's bounded-memory path (rows dequantized a block at a time) on a tiny model:
    blocks made small so that every quantized tensor is written in several."""
    import mlx.core as mx

    _, fused = export_runs.fused("llama", dequantize=False)
    whole, _ = hf_export.dense_weights(fused.path, mx.float32)
    blocks: dict = {}
    weights, _ = hf_export.dense_weights(fused.path, mx.float32, blocks)
    assert blocks and set(blocks) <= set(weights)
    monkeypatch.setattr(hf_export, "BLOCK_BYTES", 4096)
    hf_export.save_shards(weights, tmp_path, 10**9, blocks)
    assert not weights and not blocks  # consumed: nothing held once written
    written = mx.load(str(tmp_path / "model.safetensors"))
    assert set(written) == set(whole)
    for k, v in whole.items():
        assert mx.array_equal(written[k], v).item(), k


def test_gguf_working_f16_removed_and_disk_reported(export_runs):
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf, is_mlx_folder

    fcfg, fused = export_runs.fused("llama", dequantize=True)
    root, run = fused.path.parents[1], fused.path.parent
    # no hf/: 09 runs 08 first (bf16: fused/'s own files, linked)
    shutil.rmtree(run / "hf", ignore_errors=True)
    cfg = make_cfg(root, run=fcfg.run, gguf__quantizations="Q8_0", gguf__keep_unquantized=False)
    result = convert_to_gguf(cfg)
    assert not is_mlx_folder(run / "hf")  # 08's export, though its shards are fused/'s
    assert list(result.files) == ["Q8_0"]
    # (the shared fixture run's gguf/ may hold other tests' non-GGUF files)
    assert sorted(p.name for p in (run / "gguf").glob("*.gguf")) == [f"{fcfg.run}-Q8_0.gguf"]
    manifest = json.loads((run / "gguf" / "manifest.json").read_text())
    assert list(manifest["outputs"]["files"]) == ["Q8_0"]
    disk = manifest["disk"]
    now = disk_usage(run)
    assert set(disk["folders"]) == set(now["folders"]) and disk["base_bytes"] == now["folders"]["base"]["bytes"]
    others = sum(p.stat().st_size for p in (run / "gguf").iterdir() if p.name != "manifest.json")
    assert disk["folders"]["gguf"]["bytes"] == others  # measured before its manifest was written
    assert disk["x_base"] == round(disk["total_bytes"] / disk["base_bytes"], 2)
    assert disk["folders"]["hf"]["shared_bytes"] > 0
    assert disk["new_bytes"] == disk["total_bytes"] - disk["source_linked_bytes"]
    # 08 run by 09 wrote hf/'s manifest after the converter (its hash taken meanwhile): the same record
    hf_manifest = json.loads((run / "hf" / "manifest.json").read_text())
    assert manifest["inputs"]["hf_content_hash"] == hf_manifest["outputs"]["content_hash"] == hash_model_dir(run / "hf")

    # Listed in gguf.quantizations, the unquantized file is an output again.
    result = convert_to_gguf(make_cfg(root, run=fcfg.run, gguf__quantizations="F16,Q8_0",
                                      gguf__keep_unquantized=False))
    assert list(result.files) == ["F16", "Q8_0"] and result.files["F16"].is_file()


def test_gguf_keep_unquantized_auto_keeps_small_and_removes_large(export_runs, monkeypatch, capsys):
    """auto (the default): the tiny model's F16 is well under the limit and stays an output; with the
    limit below it, the same run makes it a working file and says why. YAML's false is "false"."""
    from pipeline.errors import ConfigError
    from pipeline.phases import p09_convert_to_gguf as p09

    fcfg, fused = export_runs.fused("llama", dequantize=True)
    root, run = fused.path.parents[1], fused.path.parent
    cfg = make_cfg(root, run=fcfg.run, gguf__quantizations="Q8_0")
    assert cfg.gguf.keep_unquantized == "auto"
    monkeypatch.setattr(p09, "KEEP_UNQUANTIZED_UP_TO", 1000)
    capsys.readouterr()
    result = p09.convert_to_gguf(cfg)
    assert list(result.files) == ["Q8_0"] and not (run / "gguf" / f"{fcfg.run}-F16.gguf").exists()
    assert "gguf.keep_unquantized auto:" in capsys.readouterr().out
    monkeypatch.undo()  # the real limit: kept (and the shared run's gguf/ left with its F16)
    assert list(p09.convert_to_gguf(cfg).files) == ["F16", "Q8_0"]
    assert make_cfg(root, run=fcfg.run, gguf__keep_unquantized=False).gguf.keep_unquantized == "false"
    with pytest.raises(ConfigError, match="choose one of: auto, true, false"):
        make_cfg(root, run=fcfg.run, gguf__keep_unquantized="sometimes")


def test_hf_manifest_deferred_while_the_caller_works(export_runs):
    """09's form of 08: hf/ in place at once, its manifest (content hash taken in a thread) written
    by finish(); until then hf/ is incomplete, as after a crash, and a re-run makes it again."""
    fcfg, fused = export_runs.fused("llama", dequantize=True)
    root = fused.path.parents[1]
    result = convert_to_hf(make_cfg(root, run=fcfg.run), defer_manifest=True)
    hf = result.path
    assert _inodes(hf) == _inodes(fused.path)
    assert not (hf / "manifest.json").exists()
    result.finish()
    manifest = json.loads((hf / "manifest.json").read_text())
    assert manifest["outputs"]["content_hash"] == hash_model_dir(hf)
    assert manifest["outputs"]["shards_from_fused"] == "hard-linked"
    # not linked (another dtype): written the usual way, the manifest already there
    written = convert_to_hf(make_cfg(root, run=fcfg.run, export__dtype="float32"), defer_manifest=True)
    assert (written.path / "manifest.json").is_file()
    written.finish()


def test_known_hashes_are_taken_only_for_the_very_same_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ("a.bin", "b.bin"):
        (src / name).write_bytes(name.encode() * 100)
    os.link(src / "a.bin", out / "a.bin")
    shutil.copy2(src / "b.bin", out / "b.bin")  # equal bytes, another file: could change on its own
    hashes = {"a.bin": "sha-a", "b.bin": "sha-b", "gone.bin": "sha-c"}
    assert fsio.same_inode_hashes(out, src, hashes) == {"a.bin": "sha-a"}


def test_linked_bytes_counts_files_shared_with_another_folder(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    (run / "base").mkdir(parents=True)
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 1000)
    (src / "config.json").write_bytes(b"{}")
    os.link(src / "w.bin", run / "base" / "w.bin")
    os.link(src / "w.bin", run / "base" / "w2.bin")  # the same inode twice: counted once
    (run / "base" / "config.json").write_bytes(b"{}")  # a copy: new bytes
    assert fsio.linked_bytes(run, src) == 1000
    assert fsio.linked_bytes(run, tmp_path / "empty-or-missing") == 0


def test_atomic_path_leaves_a_hard_linked_files_modes(tmp_path):
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"w")
    theirs.chmod(0o440)
    with fsio.atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        os.link(theirs, tmp / "w.bin")
        (tmp / "own.json").write_bytes(b"{}")
    assert theirs.stat().st_mode & 0o777 == 0o440
    assert (tmp_path / "out" / "w.bin").stat().st_ino == theirs.stat().st_ino


def test_disk_usage_counts_a_hard_linked_file_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"x" * 1000)
    os.link(tmp_path / "a" / "w.bin", tmp_path / "b" / "w.bin")
    (tmp_path / "b" / "c.json").write_bytes(b"{}")
    usage = disk_usage(tmp_path)
    assert usage == {"total_bytes": 1002, "folders": {"a": {"bytes": 1000, "shared_bytes": 0},
                                                      "b": {"bytes": 2, "shared_bytes": 1000}}}


def test_link_or_copy_copies_across_file_systems(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system")
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    dst = shm / f"export-disk-test-{os.getpid()}.bin"
    try:
        assert link_or_copy(src, dst) == "copied" and dst.read_bytes() == b"weights"
    finally:
        dst.unlink(missing_ok=True)
    assert link_or_copy(src, tmp_path / "same.bin") == "hard-linked"
    assert (tmp_path / "same.bin").stat().st_ino == src.stat().st_ino


def test_scratch_file_is_cleaned_after_a_crash_and_removed_on_exit(tmp_path):
    final = tmp_path / "t-F16.gguf"
    with fsio.scratch_file(final) as tmp:
        tmp.write_bytes(b"working")
        fsio.clean_stale(tmp_path)  # our own live working file is not stale
        assert tmp.exists() and tmp.name.startswith(".t-F16.gguf.tmp-")
    assert not list(tmp_path.iterdir())
