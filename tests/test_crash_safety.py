"""Crash safety of every writer, with the real writers (fsio, MLX safetensors, gguf-py, phases 01 and
08) in subprocesses: nothing is mocked.

- SIGKILL trials: each writer runs in a child and is killed at many points: after delays, when its
  temporary appears or is half written, before an fsync, before / between / after the renames
  (the child kills itself there via os.replace / os.fsync hooks). Every final name must then hold
  the complete previous output or the complete new one (or nothing, which the next run repairs),
  and the next run's clean-up leaves no temporary.
- A disk that fills up mid-write (RLIMIT_FSIZE in the child; a real 2 MB tmpfs where mounting is
  allowed): one error naming the path and the numbers, previous output intact, nothing left.
- Free-space check up front, re-save with fewer shards, output inside input, content hash checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline import fsio, manifest
from pipeline.config import KEYS, load_config
from pipeline.errors import PipelineError
from pipeline.fsio import DiskFullError, atomic_path, check_not_inside, clean_stale, hash_model_dir, sha256_file
from pipeline.manifest import ChangedOutputError, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
# The developer's config variables (RUN, MODELS_DIR, ...) must not reach the children's CLI.
ENV = {k: v for k, v in os.environ.items() if k not in {f.metadata["env"] for f in KEYS.values()}}
ENV.update(PYTHONPATH=str(ROOT), MLX_PIPELINE_NO_REEXEC="1")
FSIZE = 200_000  # bytes: the file-size limit of the disk-full children

# The child: hooks that SIGKILL it at a chosen point, `go()` (printed when setup is done and the
# write starts), and the writer's body; a PipelineError exits 2 with the message, as the CLI does.
PRELUDE = r'''
import json, os, signal, sys
from pathlib import Path
args = json.loads(sys.argv[1])
kill = args.get("kill")
_replace, _fsync, _fsyncs = os.replace, os.fsync, [0]

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

def _replace_hook(src, dst, **kw):
    if kill and kill[0] == "before_rename_to" and Path(dst).name == kill[1]: _die()
    if kill and kill[0] == "before_rename_from" and Path(src).name == kill[1]: _die()
    _replace(src, dst, **kw)
    if kill and kill[0] == "after_rename_to" and Path(dst).name == kill[1]: _die()

def _fsync_hook(fd):
    _fsyncs[0] += 1
    if kill and kill[0] == "fsync" and _fsyncs[0] == kill[1]: _die()
    _fsync(fd)

os.replace, os.fsync = _replace_hook, _fsync_hook
if args.get("sigxfsz_kills"):  # CPython ignores SIGXFSZ (the write fails with EFBIG); a C program,
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # such as llama.cpp's quantizer, is killed by it

def go():
    if args.get("fsize"):
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (args["fsize"], args["fsize"]))
    print("go", flush=True)

from pipeline.errors import PipelineError
'''
TRAILER = r'''
try:
    body()
except PipelineError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
'''

JSON = '''
from pipeline.fsio import write_json
payload = {"version": args["version"], "rows": [{"i": i, "text": "x" * 100} for i in range(args["n"])]}
go()
write_json(args["final"], payload)
'''
JSONL = '''
from pipeline.fsio import write_jsonl
rows = [{"version": args["version"], "i": i, "text": "y" * 200} for i in range(args["n"])]
go()
write_jsonl(args["final"], rows)
'''
SAFETENSORS = '''
import mlx.core as mx
from pipeline.fsio import atomic_path
arrays = {f"w{i}": mx.random.normal((256, 1024), key=mx.random.key(100 * args["version"] + i))
          for i in range(args["n"])}
mx.eval(arrays)
go()
with atomic_path(args["final"], suffix=".safetensors", expected_bytes=args.get("expected")) as tmp:  # as 07/08
    mx.save_safetensors(str(tmp), arrays, metadata={"format": "pt"})
'''
GGUF = '''
import gguf
import numpy as np
from pipeline.fsio import atomic_path
rng = np.random.default_rng(args["version"])
tensors = {f"blk.{i}.weight": rng.standard_normal((256, 1024), dtype=np.float32) for i in range(args["n"])}
go()
with atomic_path(args["final"]) as tmp:  # as 09 writes each GGUF
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_uint32("test.version", args["version"])
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
'''
PHASE = '''
import transformers, mlx_lm.utils  # the phases' slow imports, before the kill clock starts
from pipeline.config import KEYS, load_config
from pipeline.phases.p01_prepare_data import prepare_data
from pipeline.phases.p08_convert_to_hf import convert_to_hf
cfg = load_config(None, args["keys"], env={})
go()
{"data": prepare_data, "hf": convert_to_hf}[args["phase"]](cfg)
'''
CLI = '''
from pipeline.cli import main
go()
main(args["argv"])
'''


def child_code(body: str) -> str:
    return PRELUDE + "\ndef body():\n" + textwrap.indent(body, "    ") + TRAILER


def run_child(body: str, args: dict, kill=None, timeout: float = 300, prefix: list[str] | None = None):
    """Run a writer in a child; returns (exit code, stderr, seconds from `go` to exit).

    kill: None; ("delay", s) after `go`; ("temp", final, n): when final's temporary holds n bytes;
    or a point the child kills itself at: ("fsync", k), ("before_rename_to" | "before_rename_from" |
    "after_rename_to", name).
    """
    self_kill = kill if kill and kill[0] not in ("delay", "temp") else None
    cmd = [*(prefix or []), sys.executable, "-c", child_code(body), json.dumps({**args, "kill": self_kill})]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()  # "go" (or nothing if it failed during setup)
    t0 = time.monotonic()
    if kill and kill[0] == "delay":
        time.sleep(kill[1])
        p.send_signal(signal.SIGKILL)
    elif kill and kill[0] == "temp":
        final, n = Path(kill[1]), kill[2]
        while p.poll() is None and temp_bytes(final) < n and time.monotonic() - t0 < timeout:
            time.sleep(0.0002)
        p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err, time.monotonic() - t0


def temp_bytes(final: Path) -> int:
    total = 0
    for t in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            total += sum(f.stat().st_size for f in t.rglob("*") if f.is_file()) if t.is_dir() else t.stat().st_size
        except FileNotFoundError:  # renamed or removed while we looked
            pass
    return total


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def kill_name(kill) -> str:
    return f"{kill[0]} {kill[-1]:.3f}s" if kill[0] == "delay" else " ".join(str(k) for k in kill[::2])


def kill_points(final: Path, size: int, seconds: float) -> list:
    """Where to kill a writer: 9 points from before the temporary exists to after the rename."""
    return [("delay", 0.0), ("temp", str(final), 1), ("temp", str(final), size // 2), ("fsync", 1),
            ("before_rename_to", final.name), ("after_rename_to", final.name),
            *(("delay", f * seconds) for f in (0.1, 0.35, 0.7))]


# --------------------------------------------------------------------------------------------
# SIGKILL trials: single files


def file_state(final: Path, old: bytes | None, new: bytes) -> str:
    if not final.exists():
        assert old is None, f"{final} vanished: the previous output is gone"
        return "none"
    data = final.read_bytes()
    if data == new:
        return "new"
    assert data == old, (f"{final} holds {len(data)} bytes: neither the previous output "
                         f"({None if old is None else len(old)} bytes) nor the new one ({len(new)} bytes)")
    return "old"


FILE_WRITERS = {  # name: (body, file name, args)
    "write_json": (JSON, "out.json", {"n": 30000}),
    "write_jsonl": (JSONL, "out.jsonl", {"n": 20000}),
    "safetensors": (SAFETENSORS, "model.safetensors", {"n": 8}),
    "gguf": (GGUF, "model.gguf", {"n": 8}),
}


@pytest.mark.parametrize("writer", list(FILE_WRITERS))
def test_sigkill_never_leaves_a_truncated_file(tmp_path, writer):
    body, name, args = FILE_WRITERS[writer]
    final = tmp_path / "out" / name
    rc, err, _ = run_child(body, {**args, "final": str(final), "version": 1})
    assert rc == 0, err
    old = final.read_bytes()
    rc, err, seconds = run_child(body, {**args, "final": str(final), "version": 2})
    assert rc == 0, err
    new = final.read_bytes()
    assert new != old

    states = Counter()
    kills = kill_points(final, len(new), seconds)
    for i, kill in enumerate(kills):
        previous = None if i == 0 else old  # the first trial has no previous output
        final.unlink(missing_ok=True)
        if previous is not None:
            final.write_bytes(previous)
        rc, err, _ = run_child(body, {**args, "final": str(final), "version": 2}, kill)
        assert rc in (0, -signal.SIGKILL), err
        state = file_state(final, previous, new)
        states[state] += 1
        print(f"  {writer} {kill_name(kill)}: {state} (exit {rc})")
        clean_stale(final.parent)  # what the next write into this folder does first
        assert not leftovers(final.parent)
    print(f"{writer}: {len(kills)} kills, final name held: {dict(states)}")
    assert states["old"] >= 2  # the kill points before the rename did interrupt it


# --------------------------------------------------------------------------------------------
# SIGKILL trials: whole folders (phase 01's data splits, phase 08's sharded export)


def folder_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}


def folder_state(folder: Path, old: dict, new: dict) -> str:
    """'none', 'old' or 'new'; fails on a partial or mixed folder, or a manifest that does not match."""
    if not folder.exists():
        return "none"
    read_manifest(folder, "x")  # present, and every hash it records matches the files
    files = folder_files(folder)
    if files == new:
        return "new"
    assert files == old, f"{folder} is neither the previous output nor the new one: {sorted(files)}"
    return "old"


@pytest.fixture(scope="module")
def tokenizer_base(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("crash-tok") / "base"
    shutil.copytree(smollm2_tokenizer_dir, out)
    write_manifest(out, "02_fetch_base_model", {}, time.time(), {}, {})
    return out


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, tiny_hf_model) -> Path:
    """Output dir with run 't': base/ (phase 02 on a tiny llama) and fused/ (the same MLX model
    folder with a phase 07 manifest): what phase 08 needs."""
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    root = tmp_path_factory.mktemp("crash-hf")
    fetch_base_model(load_config(None, {"models_dir": str(root), "run": "t",
                                        "model.source": str(tiny_hf_model("llama"))}, env={}))
    run = root / "t"
    shutil.copytree(run / "base", run / "fused", ignore=shutil.ignore_patterns("manifest.json"))
    write_manifest(run / "fused", "07_fuse_lora", {}, time.time(), {},
                   {"path": str(run / "fused"), "content_hash": hash_model_dir(run / "fused")}, dequantized=True)
    return root


def hf_keys(root: Path, **keys) -> dict:
    return {"models_dir": str(root), "run": "t", **{k.replace("__", "."): v for k, v in keys.items()}}


def folder_trials(root: Path, folder: Path, old_keys: dict, new_keys: dict, phase: str, kills_of) -> Counter:
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p08_convert_to_hf import convert_to_hf

    {"data": prepare_data, "hf": convert_to_hf}[phase](load_config(None, old_keys, env={}))
    saved = root / "saved-old"
    shutil.copytree(folder, saved)  # copy2: mtimes too, so the manifest's file stats still hold
    old = folder_files(folder)
    rc, err, seconds = run_child(PHASE, {"phase": phase, "keys": new_keys})
    assert rc == 0, err
    new = folder_files(folder)
    assert new != old

    states = Counter()
    for kill in kills_of(folder, sum((folder / f).stat().st_size for f in new), seconds):
        shutil.rmtree(folder)
        shutil.copytree(saved, folder)
        rc, err, _ = run_child(PHASE, {"phase": phase, "keys": new_keys}, kill)
        assert rc in (0, -signal.SIGKILL), err
        state = folder_state(folder, old, new)
        states[state] += 1
        print(f"  {phase} {kill_name(kill)}: {state} (exit {rc})")
        clean_stale(folder.parent)  # as the next phase does first (start_phase)
        if state == "none":  # cut between the two renames: the previous folder is put back
            assert folder_state(folder, old, new) == "old"
        assert not leftovers(root / "t")
    return states


def folder_kill_points(folder: Path, size: int, seconds: float) -> list:
    return [*kill_points(folder, size, seconds), ("before_rename_from", folder.name), ("fsync", 4)]


def test_sigkill_data_phase_leaves_previous_splits_or_new_ones(tmp_path, tokenizer_base):
    shutil.copytree(tokenizer_base, tmp_path / "t" / "base")
    keys = {"models_dir": str(tmp_path), "run": "t", "data.source": "sample", "data.sample_rows": 400}
    states = folder_trials(tmp_path, tmp_path / "t" / "data", {**keys, "seed": 0}, {**keys, "seed": 1}, "data",
                           folder_kill_points)
    print(f"phase 01 data/: {sum(states.values())} kills, final name held: {dict(states)}")
    assert states["old"] >= 3 and states["none"] >= 1


def test_sigkill_hf_export_leaves_previous_shards_or_new_ones(tmp_path, hf_source):
    shutil.copytree(hf_source / "t", tmp_path / "t")
    old = hf_keys(tmp_path, export__dtype="bfloat16", export__max_shard_gb=0.004)
    new = hf_keys(tmp_path, export__dtype="float32", export__max_shard_gb=0.002)
    states = folder_trials(tmp_path, tmp_path / "t" / "hf", old, new, "hf", folder_kill_points)
    print(f"phase 08 hf/: {sum(states.values())} kills, final name held: {dict(states)}")
    assert states["old"] >= 3 and states["none"] >= 1
    shards = [p for p in (tmp_path / "t" / "hf").glob("*.safetensors")]
    assert len(shards) > 1  # several shards: a multi-file folder was swapped as a unit


def test_stale_temporaries_are_cleaned_and_an_interrupted_swap_restored(tmp_path, tokenizer_base, capsys):
    from pipeline.phases.common import clean_run_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "t"
    (run / f".data.old-{dead.pid}").mkdir(parents=True)  # the previous data/, moved aside by a swap
    (run / f".data.old-{dead.pid}" / "train.jsonl").write_text("{}\n")  # cut before its second rename
    (run / "gguf").mkdir()
    (run / "gguf" / f".t-F16.gguf.tmp-{dead.pid}.gguf").write_text("half a fi")
    (run / f".hf.tmp-{dead.pid}").mkdir()
    (run / f".fused.tmp-{os.getpid()}").mkdir()  # our PID, but no writer of ours owns it: an earlier process's
    alive = run / f".verify.tmp-{os.getppid()}"  # a live process's temporary is kept
    alive.mkdir()
    clean_run_folder(load_config(None, {"models_dir": str(tmp_path), "run": "t"}, env={}))
    assert (run / "data" / "train.jsonl").read_text() == "{}\n"
    assert leftovers(run) == [alive.name]
    assert "cleaned up 4 leftover(s) of an interrupted run" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# A disk that fills up mid-write


@pytest.mark.parametrize("writer", ["write_json", "safetensors"])
def test_file_size_limit_mid_write_names_path_and_shortfall(tmp_path, writer):
    body, name, args = FILE_WRITERS[writer]
    final = tmp_path / name
    final.write_bytes(b"previous output")
    expected = 8 * 256 * 1024 * 4 if writer == "safetensors" else None
    rc, err, _ = run_child(body, {**args, "final": str(final), "version": 1, "fsize": FSIZE, "expected": expected})
    assert rc == 2, err
    assert f"Could not write {final}" in err and f"file-size limit (ulimit -f) is {FSIZE:,} bytes" in err
    assert f"after {FSIZE:,} bytes" in err and "short by" in err and "MODELS_DIR" in err, err
    assert "Traceback" not in err
    assert final.read_bytes() == b"previous output" and not leftovers(tmp_path)


def test_file_size_limit_default_signal_kills_but_leaves_the_previous_output(tmp_path):
    final = tmp_path / "out.json"
    final.write_bytes(b"previous output")
    rc, err, _ = run_child(JSON, {"n": 30000, "final": str(final), "version": 1, "fsize": FSIZE, "sigxfsz_kills": True})
    assert rc == -signal.SIGXFSZ, err
    assert final.read_bytes() == b"previous output"
    assert leftovers(tmp_path)  # the killed writer's temporary ...
    clean_stale(tmp_path)
    assert not leftovers(tmp_path)  # ... goes on the next write


def test_hf_export_on_a_full_disk_fails_naming_the_path_and_keeps_the_previous_export(tmp_path, hf_source):
    shutil.copytree(hf_source / "t", tmp_path / "t")
    from pipeline.phases.p08_convert_to_hf import convert_to_hf

    convert_to_hf(load_config(None, hf_keys(tmp_path, export__max_shard_gb=0.004), env={}))
    hf = tmp_path / "t" / "hf"
    before = folder_files(hf)
    argv = ["hf", "--models-dir", str(tmp_path), "--run", "t", "--dtype", "float32"]
    rc, err, _ = run_child(CLI, {"argv": argv, "fsize": FSIZE})
    assert rc == 2, err
    assert f"Could not write {hf}:" in err and "short by" in err and f"{FSIZE:,}" in err, err
    assert folder_files(hf) == before and read_manifest(hf, "hf") and not leftovers(tmp_path / "t")


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


TMPFS = '''
from pipeline.fsio import DiskFullError, atomic_path, write_bytes, write_json
import mlx.core as mx
final = Path(args["final"])
write_bytes(final, b"previous output")
go()
out = {}
try:
    write_json(final, {"rows": ["z" * 1000] * 4000})  # 4 MB, size known: refused up front
except DiskFullError as e:
    out["up_front"] = str(e)
try:  # size not given: fails mid-write with ENOSPC
    with atomic_path(final, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), {"w": mx.ones((1024, 1024))})
except DiskFullError as e:
    out["mid_write"] = str(e)
out["previous"] = final.read_bytes().decode()
out["left"] = sorted(p.name for p in final.parent.iterdir())
print(json.dumps(out))
'''


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs (unshare -m)")
def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"mount -t tmpfs -o size=2m tmpfs {mnt} && exec \"$@\""
    code = child_code(TMPFS)
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-c", code,
                        json.dumps({"final": str(mnt / "out.json")})], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert f"Not enough free disk space for {mnt / 'out.json'} in {mnt}" in out["up_front"]
    assert "short by" in out["up_front"] and "Nothing was written" in out["up_front"]
    assert f"Could not write {mnt / 'out.json'}: the disk is full" in out["mid_write"]
    assert "No space left" in out["mid_write"] or "Unable to write" in out["mid_write"]
    assert out["previous"] == "previous output" and out["left"] == ["out.json"]


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs (unshare -m)")
def test_hf_export_refused_up_front_when_the_disk_is_too_small(tmp_path, hf_source):
    """A tmpfs holding base/ and fused/ with room for half the export: refused before writing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_size = sum(f.stat().st_size for f in (hf_source / "t").rglob("*") if f.is_file())
    export = fsio.dir_size(hf_source / "t" / "fused", "*.safetensors")  # float32 export ~ fused size
    script = (f"mount -t tmpfs -o size={run_size + export // 2} tmpfs {mnt} && cp -a {hf_source / 't'} {mnt}/t "
              f"&& exec \"$@\"")
    # shards below fused/'s own file: written, not hard-linked from fused/ (which needs no room)
    argv = ["hf", "--models-dir", str(mnt), "--run", "t", "--dtype", "float32", "--max-shard-gb", "0.004"]
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-c", child_code(CLI),
                        json.dumps({"argv": argv})], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert f"Not enough free disk space for the Hugging Face export (float32) in {mnt / 't'}" in r.stderr, r.stderr
    assert "short by" in r.stderr and "MODELS_DIR" in r.stderr


def test_free_space_check_fails_before_writing_anything(tmp_path):
    final = tmp_path / "out" / "model.safetensors"
    ran = []
    with pytest.raises(DiskFullError) as e:
        with atomic_path(final, expected_bytes=10**18, what="the fused model"):
            ran.append(True)
    msg = str(e.value)
    assert not ran and not final.exists() and not leftovers(tmp_path)
    free = fsio.free_bytes(tmp_path)
    assert f"Not enough free disk space for the fused model in {final.parent}" in msg
    assert "1,000,000,000,000,000,000 bytes" in msg and "short by" in msg and "MODELS_DIR" in msg
    assert str(free // 10**9) in msg.replace(",", "") or fsio.human_size(free) in msg


# --------------------------------------------------------------------------------------------
# Shards, output inside input, hash checks


def test_resave_with_fewer_shards_leaves_no_stale_shard(tmp_path, hf_source):
    from pipeline.phases.p08_convert_to_hf import INDEX, convert_to_hf

    shutil.copytree(hf_source / "t", tmp_path / "t")
    hf = tmp_path / "t" / "hf"

    def export(shard_gb):
        convert_to_hf(load_config(None, hf_keys(tmp_path, export__max_shard_gb=shard_gb), env={}))
        read_manifest(hf, "hf")
        return sorted(p.name for p in hf.glob("*.safetensors"))

    many = export(0.001)
    assert len(many) >= 2 and (hf / INDEX).is_file()
    assert export(5.0) == ["model.safetensors"] and not (hf / INDEX).exists()  # no model-0000N-of-... left
    again = export(0.001)
    index = json.loads((hf / INDEX).read_text())
    assert again == many and sorted(set(index["weight_map"].values())) == many


def test_output_folder_inside_the_input_folder_is_refused(tmp_path, tokenizer_base):
    from pipeline.phases.p01_prepare_data import prepare_data

    src = tmp_path / "project"
    for s in ("train", "valid"):
        (src / f"{s}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (src / f"{s}.jsonl").write_text("".join(json.dumps({"text": f"{s} {i}"}) + "\n" for i in range(6)))
    shutil.copytree(tokenizer_base, src / "models" / "t" / "base")
    cfg = load_config(None, {"models_dir": str(src / "models"), "run": "t", "data.source": str(src)}, env={})
    with pytest.raises(PipelineError,
                       match=rf"output folder {src / 'models' / 't' / 'data'} is inside data.source {src}"):
        prepare_data(cfg)
    assert not (src / "models" / "t" / "data").exists()
    with pytest.raises(PipelineError, match="inside the output folder"):
        check_not_inside(tmp_path / "models" / "t" / "base", tmp_path / "models" / "t" / "base" / "orig",
                         "model.source")
    check_not_inside(tmp_path / "models", tmp_path / "model-src", "model.source")  # siblings are fine


def test_edited_data_split_is_caught_when_a_later_phase_reads_the_manifest(tmp_path, tokenizer_base):
    from pipeline.phases.p01_prepare_data import prepare_data
    from pipeline.phases.p04_train_lora import train_lora

    shutil.copytree(tokenizer_base, tmp_path / "t" / "base")
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "data.sample_rows": 40}, env={})
    prepare_data(cfg)
    data = tmp_path / "t" / "data"
    read_manifest(data, "data")
    train = data / "train.jsonl"
    original = train.read_bytes()
    train.write_bytes(original.replace(b"Oslo", b"Rome", 1) if b"Oslo" in original else original[:-2] + b" }\n")
    assert len(train.read_bytes()) == len(original)  # same size: only the hash can tell
    for read in (lambda: read_manifest(data, "data"), lambda: train_lora(cfg)):
        with pytest.raises(ChangedOutputError) as e:
            read()
        assert f"{train} (sha256" in str(e.value) and "make data" in str(e.value)
    train.write_bytes(original)
    read_manifest(data, "data")


def test_model_folder_hash_check(tmp_path, hf_source, monkeypatch):
    """Model folders: above HASH_ALWAYS only a changed size or mtime triggers the full hash."""
    from pipeline.phases.p08_convert_to_hf import convert_to_hf

    shutil.copytree(hf_source / "t", tmp_path / "t")
    convert_to_hf(load_config(None, hf_keys(tmp_path, export__max_shard_gb=0.004), env={}))
    hf = tmp_path / "t" / "hf"
    monkeypatch.setattr(manifest, "HASH_ALWAYS", 0)
    shard = sorted(hf.glob("*.safetensors"))[-1]
    os.utime(shard)  # new date, same bytes (a copy): the full hash decides, and agrees
    read_manifest(hf, "hf")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChangedOutputError, match=rf"{shard.name} modified \(content hash .*make hf"):
        read_manifest(hf, "hf")
    shard.unlink()
    with pytest.raises(ChangedOutputError, match=rf"{shard.name} removed"):
        read_manifest(hf, "hf")
    assert read_manifest(hf, "hf", verify=False)["phase"] == "08_convert_to_hf"
