"""Shared helpers for the GGUF phases' tests (09 convert, 10 verify).

- `make_run`: a run folder without phases 07/08: a tiny HF model copied to hf/ and fused/ with
  minimal manifests, and data/test.jsonl with a few rows of the sample task.
- `converted_run`: such a run converted once per architecture to F16, Q8_0, Q5_K_M and Q4_K_M
  (cached for the session, shared by both test modules; copy it before changing anything).
- `rewrite_gguf`: copy a GGUF with some metadata changed (gguf-py reader + writer), to make a
  file whose chat template or tokenizer differs from the trained model's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.sample_task import generate_rows
from pipeline.fsio import hash_model_dir, write_jsonl
from pipeline.manifest import write_manifest

ALL_TYPES = ["Q8_0", "Q5_K_M", "Q4_K_M"]
TEST_KEYS = {"verify.max_rows": 3, "verify.max_samples": 2, "eval.max_tokens": 8, "gguf.threads": 2}


def make_cfg(root: Path, run: str = "t", **keys):
    values = {"models_dir": str(root), "run": run, **TEST_KEYS}
    values.update({k.replace("__", "."): v for k, v in keys.items()})
    return load_config(None, values, env={})


def make_run(root: Path, model_dir: Path, run: str = "t", n_rows: int = 4, hf: bool = True, **keys):
    """A run whose base/, fused/ (and hf/, unless hf=False) are `model_dir`, with a chat test split."""
    cfg = make_cfg(root, run, **keys)
    run_dir = Path(root) / run
    started = time.time()
    for name in ("base", "fused", "hf") if hf else ("base", "fused"):
        shutil.copytree(model_dir, run_dir / name)
        digest = hash_model_dir(model_dir)
        # hf/ records the fused model it was exported from, as phase 08 does.
        write_manifest(run_dir / name, f"test {name}", cfg, started,
                       inputs={"model": str(model_dir), "fused": {"content_hash": digest}},
                       outputs={"path": str(run_dir / name), "content_hash": digest})
    write_jsonl(run_dir / "data" / "test.jsonl", generate_rows(n_rows, seed=1))
    write_manifest(run_dir / "data", "test data", cfg, started, inputs={}, outputs={})
    return cfg


def rerecord(folder: Path) -> None:
    """A test edited a phase's output behind its back: record the new content in its manifest, as
    if the phase had written it (phases refuse outputs that changed since their manifest)."""
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["outputs"]["content_hash"] = hash_model_dir(folder)
    manifest.pop("file_stats", None)
    path.write_text(json.dumps(manifest))


def copy_run(cfg, root: Path, **keys):
    """A writable copy of a run (same run name) under `root`, with config keys changed."""
    shutil.copytree(Path(cfg.models_dir) / cfg.run, Path(root) / cfg.run)
    return make_cfg(root, cfg.run, **keys)


_CONVERTED: dict[str, object] = {}


def converted_run(tmp_path_factory, tiny_hf_model, model_type: str):
    """(cfg, GGUFResult) of a tiny model converted to F16 + every quantization, once per session."""
    from pipeline.phases.p09_convert_to_gguf import convert_to_gguf

    if model_type not in _CONVERTED:
        root = tmp_path_factory.mktemp(f"gguf-{model_type}")
        cfg = make_run(root, tiny_hf_model(model_type), **{"gguf.quantizations": ALL_TYPES})
        _CONVERTED[model_type] = (cfg, convert_to_gguf(cfg))
    return _CONVERTED[model_type]


def rewrite_gguf(src: Path, dst: Path, changes: dict, add_uint32: dict | None = None) -> Path:
    """Copy a GGUF, replacing the values of the metadata keys in `changes` (value or fn(old) -> new)
    and adding the uint32 keys of `add_uint32` ("{arch}" in a key is the file's architecture)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        value = field.contents()
        if field.name in changes:
            change = changes[field.name]
            value = change(value) if callable(change) else change
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for key, value in (add_uint32 or {}).items():
        writer.add_uint32(key.format(arch=arch), value)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst
