"""09 Convert the Hugging Face folder to GGUF for llama.cpp and LM Studio.

llama.cpp's own converter writes the unquantized file (gguf.outtype: F16, BF16 or F32), then
llama.cpp's quantizer makes each type in gguf.quantizations from it (Q8_0, Q5_K_M, Q4_K_M, ...).
Both come from the pinned llama-cpp-python release (pipeline/llamacpp.py). On models whose rows
are not a multiple of 256 wide (every tiny model, SmolLM2) K-quants fall back per tensor
(Q4_K -> Q5_0, Q6_K -> Q8_0): llama.cpp's choice, kept.

gguf.imatrix adds <TYPE>-imatrix files, gguf.native the --no-dequantize fuse transcoded
(<Q4_1|Q5_1>-native, left out when that fuse lost the fine-tune), gguf.adapter_gguf the LoRA GGUF
with the bases it applies to: the de-quantized training base as F16 and, for a QLoRA run, the
training base's own MLX blocks (<Q4_1|Q5_1>-native-base): with the LoRA GGUF, the trained model.

Input: models/<run>/hf/ (phase 08, run here first when only fused/ exists).
Output: models/<run>/gguf/<run>-*.gguf, and manifest.json listing each file with its kind
(pipeline/gguf_kinds.py: what it is made from and what 10 verify compares it with).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from .. import arch, gguf_kinds, gguf_native, imatrix, llamacpp
from ..adapter_gguf import adapter_gguf_path, native_base_path, paired_base_path, write_adapter_gguf
from ..errors import MissingInputError, PipelineError
from ..fsio import (
    atomic_path,
    disk_usage,
    ensure_free_space,
    gguf_size_estimate,
    hash_model_dir,
    human_size,
    linked_bytes,
    scratch_file,
    sha256_file,
)
from ..manifest import MANIFEST, is_current, read_manifest, write_manifest
from ..modeling import check_weight_files, read_config
from ..paths import RunPaths
from ..survival import lost_message
from .common import done, start_phase

# Types llama.cpp quantizes without looking at an importance matrix.
NO_IMATRIX = {"Q8_0", "F16", "BF16", "F32"}
# gguf.keep_unquantized auto keeps the unquantized file up to this size (about 1 B parameters in F16):
# above it, a second full-precision copy the user did not list costs more disk than its check is worth.
KEEP_UNQUANTIZED_UP_TO = 2 * 10**9


@dataclass
class GGUFResult:
    path: Path
    files: dict[str, Path] = field(default_factory=dict)  # TYPE -> file
    table: list[dict] = field(default_factory=list)
    parameters: int = 0


def convert_to_gguf(cfg) -> GGUFResult:
    started = start_phase(cfg, "09 convert to GGUF", ["gguf"])
    paths = RunPaths(cfg)
    llamacpp.require_converter()
    llamacpp.check_runtime()
    native, native_paths = None, None  # "<Q4_1|Q5_1>-native": MLX's quantized weights, not quantized again
    if cfg.gguf.native:  # fail before a long export when there is nothing to transcode
        native_paths, native_type = _native_source(cfg, paths)
        native = f"{native_type}-native"
    if cfg.gguf.imatrix:
        for name in ("llama-imatrix", "llama-quantize"):  # fail early, naming how to build them
            llamacpp.tool(name)
    hf, finish_hf = _hf_input(cfg, paths)
    # hf/ made just now may have its manifest still coming (its hash runs beside the converter)
    hf_manifest = read_manifest(hf, "hf") if finish_hf is None else None
    model_type = check_convertible(hf)
    check_weight_files(hf)  # headers validated before the converter (or our size estimate) reads them

    out = paths.gguf
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new one is written
    types = list(dict.fromkeys([cfg.gguf.outtype.upper(), *cfg.gguf.quantizations]))
    imatrix_types = [t for t in types[1:] if t not in NO_IMATRIX] if cfg.gguf.imatrix else []
    files = {t: out / f"{cfg.run}-{t}.gguf" for t in types}
    total = len(types) + len(imatrix_types) + bool(imatrix_types) + bool(native)
    steps = iter(range(1, total + 1))
    timings: dict[str, float] = {}
    native_stats = imatrix_stats = None

    ensure_free_space(out, gguf_size_estimate(hf, types + [f"{t}-imatrix" for t in imatrix_types]),
                      f"the GGUF files ({', '.join(types)})")
    outtype = types[0]
    hashes = BackgroundHashes()
    keep_source, why_not = _keeps_unquantized(cfg, hf, outtype)
    with contextlib.ExitStack() as stack:
        # The unquantized file stays under its temporary name until every file made from it exists:
        # the quantizer reads it meanwhile, while its fsync and hash run in threads beside the quantizer.
        source = stack.enter_context(atomic_path(files[outtype]) if keep_source else scratch_file(files[outtype]))
        for t in types:
            t0 = time.time()
            if t == outtype:
                _step(next(steps), total, t, f"llama.cpp's converter on {hf}" + ("" if keep_source else
                                                                                  " (a working file)"))
                try:
                    _convert(hf, source, cfg.gguf.outtype)
                finally:
                    if finish_hf is not None:  # 08's manifest, its hash taken while the converter ran
                        finish_hf()
                        hf_manifest = read_manifest(hf, "hf")
                _record(timings, t, source, t0)
                if keep_source:
                    hashes.add(files[t], source, fsync=True)
                continue
            with atomic_path(files[t]) as tmp:
                _step(next(steps), total, t, f"llama.cpp's quantizer ({cfg.gguf.threads or 'all'} threads)")
                llamacpp.quantize(source, tmp, t, cfg.gguf.threads, name=files[outtype])
                hashes.add(files[t], tmp)  # hashed while atomic_path syncs and renames it
            _record(timings, t, files[t], t0)
        if imatrix_types:
            _step(next(steps), total, "imatrix",
                  f"llama-imatrix over {paths.data}/train.jsonl through the chat template")
            imatrix_stats = _make_imatrix(cfg, paths, hf, source)
            for t in imatrix_types:
                name = f"{t}-imatrix"
                files[name] = out / f"{cfg.run}-{name}.gguf"
                t0 = time.time()
                _step(next(steps), total, name, "llama-quantize --imatrix")
                with atomic_path(files[name]) as tmp:
                    imatrix.quantize_with_imatrix(source, tmp, t, paths.imatrix / "imatrix.gguf", cfg.gguf.threads)
                types.append(name)
                _record(timings, name, files[name], t0)
                hashes.add(files[name])
        if native:
            t0 = time.time()
            files[native] = out / f"{cfg.run}-{native}.gguf"
            _step(next(steps), total, native, f"MLX's quantized weights of {native_paths.fused} as GGUF blocks "
                                              "(no second quantization)")
            native_stats = _write_native(cfg, native_paths, source, files[native])
            if native_stats.get("skipped"):
                del files[native]
                click.echo(f"      not exported: {native_stats['skipped']}")
            else:
                types.append(native)
                _record(timings, native, files[native], t0, f": {native_stats['transcoded']} tensors transcoded, "
                        f"max |GGUF - MLX| {native_stats['max_abs_diff']:.2g}")
                hashes.add(files[native])
        parameters = gguf_parameters(source)
    if not keep_source:
        types.remove(outtype)
        del files[outtype]
        click.echo(f"      removed the working {outtype} file ({why_not}; gguf.keep_unquantized: true, or {outtype} "
                   "in gguf.quantizations, keeps it)")

    keep = set(files.values())
    adapter = native_base = None
    if cfg.gguf.adapter_gguf:
        keep |= {adapter_gguf_path(cfg), paired_base_path(cfg), *_native_bases(cfg)}
    _remove_stale(out, cfg.run, keep)
    if cfg.gguf.adapter_gguf:
        click.echo("[adapter] LoRA GGUF (llama.cpp convert_lora_to_gguf.py) + the base GGUF it pairs with")
        adapter = write_adapter_gguf(cfg)
        click.echo(f"      {Path(adapter['adapter_gguf']).name} on {Path(adapter['base_gguf']).name} "
                   f"(base {'reused' if adapter['base']['reused'] else 'written'})")
        native_base = _write_native_base(cfg, paths)
    table = [{"type": t, "file": files[t].name, "size_bytes": files[t].stat().st_size,
              "bits_per_weight": round(files[t].stat().st_size * 8 / parameters, 2), "seconds": timings[t]}
             for t in types]
    entries = {r["type"]: gguf_kinds.entry(_kind(r["type"], outtype, native), r["type"], files[r["type"]],
                                           sha256=hashes.get(files[r["type"]]),
                                           **{k: r[k] for k in ("bits_per_weight", "seconds")}) for r in table}
    if adapter:
        entries.update(_pair_entries(cfg, native_base))
    disk = run_disk_report(paths)
    write_manifest(
        out, "09_convert_to_gguf", cfg, started,
        inputs={"hf": str(hf), "model_type": model_type,
                "hf_content_hash": hf_manifest.get("outputs", {}).get("content_hash") or hash_model_dir(hf)},
        outputs={"files": entries, **({"adapter_gguf": adapter} if adapter else {})},
        parameters=parameters,
        native=native_stats,
        native_base=native_base,
        imatrix=imatrix_stats,
        toolchain={"llama_cpp_python": llamacpp.VERSION, "converter": str(llamacpp.converter_dir()),
                   "quantizer": str(llamacpp.quantize_binary() or "llama_cpp.llama_model_quantize")},
        disk=disk,
    )
    click.echo(format_table(table, parameters))
    click.echo(format_disk(disk))
    done(f"GGUF files ready in {out}")
    return GGUFResult(out, files, table, parameters)


def convert_given(cfg, source: Path, prefix: Path) -> GGUFResult:
    """The guides' form: `--hf-model DIR --output PREFIX --quantization Q4_K_M[,Q8_0]` writes
    PREFIX-<TYPE>.gguf for each type, and PREFIX.manifest.json. DIR may also be an MLX model
    folder (`mlx_lm fuse`, 07), converted by 08 into a temporary folder first. The unquantized
    file is kept only when asked for (--quantization F16, or --keep-unquantized true)."""
    import tempfile

    from ..paths import GivenPaths, require_folder
    from .p08_convert_to_hf import convert_to_hf

    source, prefix = Path(source), Path(prefix)
    started = start_phase(cfg, "09 convert to GGUF", ["gguf"], given={"model": source, "output": f"{prefix}-*.gguf"})
    if prefix.name.endswith(".gguf") or not prefix.name:
        raise PipelineError(f"--output {prefix}: give a prefix such as {prefix.parent / 'my-model'}; the files are "
                            "named PREFIX-Q4_K_M.gguf and so on.")
    ignored = [k for k in ("native", "adapter_gguf", "imatrix") if getattr(cfg.gguf, k)]
    if ignored:
        click.echo(f"note: gguf.{', gguf.'.join(ignored)} need a run folder (its adapter and data); "
                   "not made with --hf-model.")
    llamacpp.require_converter()
    llamacpp.check_runtime()
    require_folder(source, "--hf-model")
    check_weight_files(source)
    model_type = check_model_type(source)
    types = list(dict.fromkeys(cfg.gguf.quantizations))
    # F16 / BF16 in the list: the converter's own file is kept (and is the quantizer's source)
    outtype = next((t for t in types if t in ("F16", "BF16")), cfg.gguf.outtype.upper())
    if cfg.gguf.keep_unquantized == "true" and outtype not in types:  # asked for by name: kept too
        types.insert(0, outtype)
    files = {t: prefix.parent / f"{prefix.name}-{t}.gguf" for t in dict.fromkeys([outtype, *types])}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    manifest_name = f"{prefix.name}.manifest.json"
    _check_given_files(prefix.parent / manifest_name, [f for t, f in files.items() if t in types])
    ensure_free_space(prefix.parent, gguf_size_estimate(source, [outtype, *types]),
                      f"the GGUF files ({', '.join(types)})")
    timings: dict[str, float] = {}
    hashes = BackgroundHashes()
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=f".{prefix.name}-work-") as work:
        hf = source
        if is_mlx_folder(source):  # MLX names, maybe quantized: 08 makes the HF folder the converter reads
            click.echo(f"{source} is an MLX model folder: converting it to Hugging Face first (phase 08)")
            hf = Path(work) / "hf"
            convert_to_hf(cfg, GivenPaths(cfg, fused=source, hf=hf))
        check_convertible(hf)
        unquantized = files[outtype] if outtype in types else Path(work) / f"{prefix.name}-{outtype}.gguf"
        total = len(types) + (outtype not in types)
        steps = iter(range(1, total + 1))
        t0 = time.time()
        with atomic_path(unquantized) as tmp:
            _step(next(steps), total, outtype, f"llama.cpp's converter on {hf}")
            _convert(hf, tmp, outtype.lower())
        _record(timings, outtype, unquantized, t0)
        if outtype in types:
            hashes.add(unquantized)
        parameters = gguf_parameters(unquantized)
        for t in types:
            if t == outtype:
                continue
            t0 = time.time()
            with atomic_path(files[t]) as tmp:
                _step(next(steps), total, t, f"llama.cpp's quantizer ({cfg.gguf.threads or 'all'} threads)")
                llamacpp.quantize(unquantized, tmp, t, cfg.gguf.threads)
            _record(timings, t, files[t], t0)
            hashes.add(files[t])
    table = [{"type": t, "file": files[t].name, "size_bytes": files[t].stat().st_size,
              "bits_per_weight": round(files[t].stat().st_size * 8 / parameters, 2), "seconds": timings[t]}
             for t in types]
    write_manifest(
        prefix.parent, "09_convert_to_gguf", cfg, started, name=manifest_name,
        inputs={"model": str(source), "model_type": model_type, "content_hash": hash_model_dir(source)},
        outputs={"files": {r["type"]: gguf_kinds.entry(_kind(r["type"], outtype, None), r["type"], files[r["type"]],
                                                        sha256=hashes.get(files[r["type"]]),
                                                        bits_per_weight=r["bits_per_weight"], seconds=r["seconds"])
                           for r in table}},
        parameters=parameters,
        toolchain={"llama_cpp_python": llamacpp.VERSION, "converter": str(llamacpp.converter_dir()),
                   "quantizer": str(llamacpp.quantize_binary() or "llama_cpp.llama_model_quantize")},
    )
    click.echo(format_table(table, parameters))
    done(f"GGUF files ready: {', '.join(str(files[t]) for t in types)}")
    return GGUFResult(prefix.parent, {t: files[t] for t in types}, table, parameters)


class BackgroundHashes:
    """sha256 of each finished output, computed in a thread while llama.cpp makes the next file (its
    tools run in child processes, and hashlib releases the GIL): the manifest's hashes cost no wait."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.jobs = ThreadPoolExecutor(2, thread_name_prefix="sha256"), {}

    def add(self, final: Path, path: Path | None = None, fsync: bool = False) -> None:
        """Hash `path` (default `final`), recorded as `final`'s. The file is opened here, so that a
        rename of `path` into place right after does not race the thread. `fsync`: also flush it to
        disk in the other thread (atomic_path's own fsync before the rename then finds nothing to do)."""
        if fsync:
            self.pool.submit(_fsync_and_close, open(path or final, "rb"))  # noqa: SIM115 (closed by the job)
        self.jobs[Path(final)] = self.pool.submit(_sha256_and_close, open(path or final, "rb"))  # noqa: SIM115

    def get(self, path: Path) -> str | None:
        job = self.jobs.get(Path(path))
        return job.result() if job else None


def _fsync_and_close(f) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


def _sha256_and_close(f) -> str:
    try:
        return sha256_file(f)
    finally:
        f.close()


def is_mlx_folder(model_dir: Path) -> bool:
    """Written by MLX (mlx-lm's save_model marks its safetensors 'mlx'; HF writers mark them 'pt'),
    or quantized the MLX way: either way not what llama.cpp's converter reads."""
    from safetensors import safe_open

    if "quantization" in read_config(model_dir):
        return True
    if (Path(model_dir) / MANIFEST).is_file() and _is_hf_export(Path(model_dir)):
        return False  # 08's export, whose shards may be fused/'s own (hard links), marked 'mlx'
    first = sorted(Path(model_dir).glob("*.safetensors"))[0]
    with safe_open(str(first), framework="numpy") as f:
        return (f.metadata() or {}).get("format") == "mlx"


def _is_hf_export(model_dir: Path) -> bool:
    import json

    try:
        return json.loads((model_dir / MANIFEST).read_text()).get("phase") == "08_convert_to_hf"
    except (OSError, ValueError, AttributeError):
        return False


def _check_given_files(manifest: Path, files: list[Path]) -> None:
    """Replace only GGUF files that an earlier run of this command wrote (listed in its manifest)."""
    import json

    try:
        ours = {Path(f["path"]).name for f in json.loads(manifest.read_text())["outputs"]["files"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = set()
    theirs = [str(f) for f in files if f.exists() and f.name not in ours]
    if theirs:
        raise PipelineError(f"{', '.join(theirs)} already exist(s) and were not written by this command "
                            f"(not in {manifest.name}). Nothing was changed; choose another --output prefix.")


def _native_source(cfg, paths: RunPaths) -> tuple[RunPaths, str]:
    """Where the native GGUF comes from: fused/ when it kept MLX's quantization; for a QLoRA run
    fused --de-quantize, a second fuse of the same adapter without de-quantizing (fused-native/)."""
    fused = paths.fused
    dequantized = (fused / MANIFEST).is_file() and read_manifest(fused, "fuse").get("dequantized") is True
    if dequantized and cfg.quantize.enabled and (paths.quantized / MANIFEST).is_file():
        return RunPaths(cfg, "native"), gguf_native.check_native_source(paths.quantized)
    return paths, gguf_native.check_native_source(fused)


def _write_native(cfg, native_paths: RunPaths, f16_of_fused: Path, dst: Path) -> dict:
    """The native GGUF. When fused/ is de-quantized, the adapter is fused a second time without
    de-quantizing (fused-native/, hf-native/) and transcoded from there, with its own F16 file."""
    if native_paths.fused == RunPaths(cfg).fused:  # fused/ itself kept the quantization
        stats = gguf_native.write_native_gguf(native_paths.fused, f16_of_fused, dst)
    else:
        from .p07_fuse_lora import fuse
        from .p08_convert_to_hf import convert_to_hf

        click.echo(f"      fused/ is de-quantized: fusing again with --no-dequantize into {native_paths.fused}")
        fuse(replace(cfg, fuse=replace(cfg.fuse, dequantize=False, rebase=False, strict=False)), native_paths)
        survival = read_manifest(native_paths.fused, "fuse").get("survival") or {}
        if survival.get("lost"):  # a file that is not the fine-tune is not shown as an export of it
            dst.unlink(missing_ok=True)
            return {"source": str(native_paths.fused), "skipped": lost_message(survival, False, False)}
        if survival.get("lost", False) is None:  # a large model: 07 ran no end-to-end check (fuse --strict does)
            click.echo("      its end-to-end survival was not measured (a re-quantized fuse of a model over "
                       "0.5 B parameters): 10 verify's KL to the trained model tells whether it kept the fine-tune")
        convert_to_hf(cfg, native_paths)
        f16 = native_paths.hf / ".source-F16.gguf"  # the transcoder's template file, not an output
        try:
            _convert(native_paths.hf, f16, "f16")
            stats = gguf_native.write_native_gguf(native_paths.fused, f16, dst)
        finally:
            # hf-native/ is dense (full precision) and only fed the converter: not kept on disk
            shutil.rmtree(native_paths.hf, ignore_errors=True)
    stats.pop("tensors", None)
    return {**stats, "source": str(native_paths.fused)}


def _kind(key: str, outtype: str, native: str | None) -> gguf_kinds.Kind:
    if key == outtype:
        return gguf_kinds.CONVERTER
    if key == native:
        return gguf_kinds.NATIVE_FUSE
    return gguf_kinds.IMATRIX if key.endswith("-imatrix") else gguf_kinds.QUANTIZER


def _write_native_base(cfg, paths: RunPaths) -> dict | None:
    """<run>-<Q4_1|Q5_1>-native-base.gguf: the QLoRA training base's own MLX blocks, transcoded with the
    de-quantized training base's F16 GGUF as template. With the LoRA GGUF it is the trained model."""
    for stale in _native_bases(cfg):
        stale.unlink(missing_ok=True)
    if not (cfg.quantize.enabled and (paths.quantized / MANIFEST).is_file()):
        return None  # LoRA on a full-precision base: the F16 base + LoRA pair is the exact one
    try:
        native_type = gguf_native.check_native_source(paths.quantized)
    except PipelineError as e:
        click.echo(f"      no native base GGUF: {e}")
        return {"skipped": str(e)}
    t0 = time.time()
    out = native_base_path(cfg, native_type)
    click.echo(f"[adapter] {out.name}: MLX's {native_type} blocks of {paths.quantized} (the training base) as GGUF")
    stats = gguf_native.write_native_gguf(paths.quantized, paired_base_path(cfg), out)
    stats.pop("tensors", None)
    click.echo(f"      {human_size(out.stat().st_size)} in {time.time() - t0:.1f} s: {stats['transcoded']} tensors "
               f"transcoded, max |GGUF - MLX| {stats['max_abs_diff']:.2g}")
    return {**stats, "type": native_type, "source": str(paths.quantized), "path": str(out),
            "seconds": round(time.time() - t0, 2)}


def _native_bases(cfg) -> list[Path]:
    """Every name the native base GGUF can have (4-bit -> Q4_1, 5-bit -> Q5_1)."""
    return [native_base_path(cfg, gguf_native.native_type_name(bits)) for bits in (4, 5)]


def _pair_entries(cfg, native_base: dict | None) -> dict:
    """Manifest entries of the LoRA GGUF and the base GGUFs it pairs with (each pair is one export)."""
    lora = adapter_gguf_path(cfg)
    entries = {"LoRA-F16": gguf_kinds.entry(gguf_kinds.LORA, "LoRA-F16", lora)}
    entries["adapter-base-F16"] = gguf_kinds.entry(gguf_kinds.LORA_BASE_F16, "adapter-base-F16", paired_base_path(cfg),
                                                   lora=lora.name, pair_key=gguf_kinds.pair_key("F16"))
    if native_base and not native_base.get("skipped"):
        key = f"{native_base['type']}-native-base"
        entries[key] = gguf_kinds.entry(gguf_kinds.NATIVE_BASE, key, Path(native_base["path"]), lora=lora.name,
                                        pair_key=gguf_kinds.pair_key(key))
    return entries


def _make_imatrix(cfg, paths: RunPaths, hf: Path, model_gguf: Path) -> dict:
    """The training split through the chat template, then llama-imatrix over it with the F16 model."""
    folder = paths.imatrix
    calib = imatrix.calibration_text(paths.data, hf, folder / "calibration.txt")
    click.echo(f"      {calib['rows']} training rows, {calib['tokens']:,} tokens")
    stats = imatrix.compute_imatrix(model_gguf, folder / "calibration.txt", folder / "imatrix.gguf",
                                    calib["tokens"], cfg.gguf.imatrix_chunk_tokens, cfg.gguf.imatrix_chunks,
                                    cfg.gguf.threads)
    click.echo(f"      {stats['chunks']} chunks x {stats['chunk_tokens']} tokens in {stats['seconds']:.1f} s "
               f"(F16 perplexity on the training text {stats['perplexity']})")
    return {**calib, **stats, "path": str(folder / "imatrix.gguf"), "sha256": sha256_file(folder / "imatrix.gguf")}


def _hf_input(cfg, paths: RunPaths):
    """hf/ from phase 08; when only phase 07 ran, or fused/ changed since, run 08 first. Returns
    (hf/, None), or (hf/, finish) when 08 ran here and left its manifest to `finish()` (p08's doc)."""
    fused = read_manifest(paths.fused, "fuse") if (paths.fused / MANIFEST).is_file() else None
    if (paths.hf / MANIFEST).is_file():
        recorded = read_manifest(paths.hf, "hf").get("inputs", {}).get("fused", {}).get("content_hash")
        if fused is None or is_current(recorded, fused):
            return paths.hf, None
        click.echo(f"{paths.hf} was exported from an earlier fused model: exporting {paths.fused} again (phase 08).")
    if fused is not None:
        check_model_type(paths.fused)  # fail before a long export
        if not (paths.hf / MANIFEST).is_file():
            click.echo(f"{paths.hf} is missing: converting {paths.fused} to Hugging Face first (phase 08).")
        from .p08_convert_to_hf import convert_to_hf

        return paths.hf, convert_to_hf(cfg, defer_manifest=True).finish
    raise MissingInputError(
        f"Neither {paths.hf} nor {paths.fused} is complete (no {MANIFEST}). "
        "Run `make fuse` (or `mlx-pipeline fuse`) first; `make gguf` runs it for you."
    )


def check_model_type(model_dir: Path) -> str:
    """The folder's model_type, if the architecture registry knows it (else the supported list)."""
    model_type = read_config(model_dir).get("model_type")
    try:
        arch.get(model_type)
    except PipelineError as e:
        raise PipelineError(f"{model_dir}: {e}") from None
    return model_type


def check_convertible(hf: Path) -> str:
    """Registry and llama.cpp's converter must both know the model; fail early with what is supported."""
    model_type = check_model_type(hf)
    names = read_config(hf).get("architectures") or []
    known = llamacpp.converter_architectures()
    if not names or names[0] not in known:
        what = f"architecture '{names[0]}'" if names else "no `architectures` entry in config.json"
        raise PipelineError(
            f"{hf}: llama.cpp's converter ({llamacpp.converter_dir()}) cannot convert {what} "
            f"(model_type {model_type}). Supported model types: {', '.join(arch.supported())}."
        )
    return model_type


def _convert(hf: Path, outfile: Path, outtype: str) -> None:
    from tqdm import tqdm

    # The converter logs one line per tensor ("name, torch.float32 --> F16, shape = ...").
    with tqdm(desc="      tensors", unit="tensor", dynamic_ncols=True, leave=False) as bar:
        llamacpp.convert_hf_to_gguf(hf, outfile, outtype, on_line=lambda line: " --> " in line and bar.update())


def gguf_parameters(path: Path) -> int:
    """Weights stored in a GGUF (tied embeddings once): the denominator of bits per weight."""
    return llamacpp.n_params(path)


def _remove_stale(out: Path, run: str, keep: set[Path]) -> None:
    """Earlier outputs of this run that were not remade (another quantization list) would be
    verified against a model they no longer match."""
    for f in out.glob(f"{run}-*.gguf"):
        if f not in keep:
            click.echo(f"removing {f.name} (not in gguf.quantizations any more)")
            f.unlink()


def _record(timings: dict, key: str, path: Path, t0: float, detail: str = "") -> None:
    timings[key] = round(time.time() - t0, 2)
    click.echo(f"      {human_size(path.stat().st_size)} in {timings[key]:.1f} s{detail}")


def _keeps_unquantized(cfg, hf: Path, outtype: str) -> tuple[bool, str]:
    """Whether the converter's unquantized file is an output (else a working file), and why not."""
    setting = cfg.gguf.keep_unquantized
    if setting == "true" or outtype in [q.upper() for q in cfg.gguf.quantizations]:
        return True, ""
    if setting == "false":
        return False, "gguf.keep_unquantized is false"
    size = gguf_size_estimate(hf, [outtype])
    if size <= KEEP_UNQUANTIZED_UP_TO:
        return True, ""
    return False, f"gguf.keep_unquantized auto: {human_size(size)} is above {human_size(KEEP_UNQUANTIZED_UP_TO)}"


def _step(i: int, n: int, type_name: str, how: str) -> None:
    click.echo(f"[{i}/{n}] {type_name}: {how}")


def run_disk_report(paths: RunPaths) -> dict:
    """What the run folder holds on disk, in total and per phase folder (hard links counted once),
    against its base model: the figure a phase that keeps needless full-precision copies inflates."""
    usage = disk_usage(paths.root)
    base = usage["folders"].get(paths.base.name, {}).get("bytes", 0)
    # 02 hard-links a local source's weights: those bytes were on the disk before the run
    source = Path(paths.cfg.model.source) if not str(paths.cfg.model.source).startswith("embedded:") else None
    linked = linked_bytes(paths.root, source) if source is not None and source.is_dir() else 0
    new = usage["total_bytes"] - linked
    return {**usage, "base_bytes": base, "x_base": round(usage["total_bytes"] / base, 2) if base else None,
            "source_linked_bytes": linked, "new_bytes": new, "new_x_base": round(new / base, 2) if base else None}


def format_disk(disk: dict) -> str:
    x = f" = {disk['x_base']}x the base model" if disk.get("x_base") else ""
    lines = [f"\nrun folder on disk: {human_size(disk['total_bytes'])}{x} (hard-linked files counted once)"]
    if disk.get("source_linked_bytes"):
        lines.append(f"  of which {human_size(disk['source_linked_bytes'])} are the model source's own files "
                     f"(hard links): {human_size(disk['new_bytes'])} new = {disk['new_x_base']}x the base model")
    for name, part in sorted(disk["folders"].items(), key=lambda kv: -kv[1]["bytes"]):
        shared = f" (+{human_size(part['shared_bytes'])} shared)" if part["shared_bytes"] else ""
        lines.append(f"  {name + '/':<18} {human_size(part['bytes']):>9}{shared}")
    return "\n".join(lines)


def format_table(table: list[dict], parameters: int) -> str:
    lines = [f"\n{parameters:,} parameters", "| type | file | size | bits/weight | seconds |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['type']} | {r['file']} | {human_size(r['size_bytes'])} | "
                     f"{r['bits_per_weight']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)
