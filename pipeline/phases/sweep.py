"""Sweep: train one adapter per trial of a grid (or list) and compare them, adapters only on disk.

    mlx-pipeline sweep --config configs/default.yaml --sweep configs/sweep.yaml [--merge]

Every trial reads the run's one base, quantized base and data (made first by 02, 01, 03 when missing)
and writes only its own folder, models/<run>/sweeps/<name>/<trial-id>/: adapters/ (04 train_lora),
eval/ (05 evaluate) and manifest.json, written last. A re-run skips finished trials and resumes an
interrupted one from its newest checkpoint. Evaluation (test loss, task metric) loads the adapter on
the base (B2, the default) or, with --merge, scores a full-precision fuse (07) written into a
temporary folder of the sweep and deleted afterwards (B1; its bytes are reported). The sweep folder
then holds results.md/.json/.png and report.html (pipeline/sweep_report.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from ..checkpoints import CHECKPOINTS, complete_checkpoints
from ..errors import MissingInputError, PipelineError
from ..fsio import clean_stale, disk_usage, human_size, sha256_file, write_json
from ..manifest import MANIFEST, read_manifest, write_manifest
from ..paths import RunPaths
from ..progress import Eta, clock
from ..sweep_report import storage, storage_lines, write_results
from ..sweep_spec import Trial, parse_sweep, read_block, trial_config
from ..trainer import TrainingInterrupted
from .common import done, start_phase

PHASE = "sweep_trial"
MERGE_PREFIX = ".merge-"


class SweepInterrupted(PipelineError):
    """Ctrl-C outside training (evaluation, fuse): nothing half-written is kept; exit 130."""

    exit_code = 130


@dataclass
class SweepResult:
    folder: Path
    trials: list[dict]
    storage: dict
    files: dict


class TrialPaths(RunPaths):
    """A trial's folders: adapters/ and eval/ in its own folder, the run's data, base and quantized
    base read in place; `merged`: where --merge fuses (a temporary folder of the sweep)."""

    def __init__(self, cfg, trial_dir: Path, merged: Path | None = None):
        super().__init__(cfg)
        self.run_root, self.root, self.merged = self.root, Path(trial_dir), merged

    data = property(lambda self: self.run_root / "data")
    base = property(lambda self: self.run_root / "base")
    quantized = property(lambda self: self.run_root / "base-quantized")

    @property
    def fused(self) -> Path:
        if self.merged is None:
            raise PipelineError("a sweep trial fuses only with --merge")
        return self.merged


def sweep(cfg, sweep_file: str | Path | None = None, own_config: bool = False, merge: bool = False,
          name: str | None = None, keep_checkpoints: bool = False) -> SweepResult:
    """`sweep_file`: the YAML with the `sweep:` block; `own_config`: it is also the run's --config;
    `keep_checkpoints`: keep a finished trial's resumable checkpoints (adapter + Adam's state, 3x the
    adapter), which only a longer re-training of that trial needs."""
    if sweep_file is None:
        raise MissingInputError("No sweep given: pass --sweep FILE (see configs/sweep.yaml) or a --config YAML "
                                "with a top-level `sweep:` block.")
    spec = parse_sweep(read_block(sweep_file, own_config), sweep_file, name=name)  # every error before any work
    started = start_phase(cfg, f"sweep {spec.name}: {len(spec.trials)} trial(s)", ["train", "eval"])
    _shared_inputs(cfg)
    run = RunPaths(cfg)
    folder = run.root / "sweeps" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    mode = "merged" if merge else "adapter"
    write_json(folder / "plan.json", {"sweep": spec.name, "source": str(spec.source), "mode": mode,
                                      "trials": [{"index": t.index, "id": t.id, "label": t.label,
                                                  "settings": t.settings} for t in spec.trials]})
    click.echo(f"sweep folder: {folder}/  (eval: {_mode_text(mode)})")

    manifests, n = [], len(spec.trials)
    # From the trials this process ran; the first (model load, MLX's compile) is left out once a second is timed.
    eta = Eta(total=n)
    for trial in spec.trials:
        left = n - eta.done
        prefix = f"trial {trial.index}/{n} ({trial.label})"
        t0 = time.time()
        eta_text = (f"{eta.text(provisional=True)} for {left} trial(s)" if eta.steps
                    else "eta after the first trial")
        try:
            manifest, ran = _run_trial(cfg, trial, folder, mode, prefix, eta_text, keep_checkpoints)
        except TrainingInterrupted as e:
            said = str(e).split("; resume with")[0]  # the trainer's hint names `make train`, not the sweep
            raise TrainingInterrupted(f"{said}\nsweep stopped in {prefix}; run the same command again to continue "
                                      "(finished trials are skipped, this one resumes from its checkpoint).",
                                      e.step, e.checkpoint, e.exit_code) from None
        except KeyboardInterrupt:
            _remove_leftovers(folder)
            raise SweepInterrupted(f"sweep stopped in {prefix} (Ctrl-C); run the same command again to continue "
                                   "(finished trials are skipped).") from None
        if ran:
            eta.step(time.time() - t0)
        else:
            eta.skip()
        manifests.append(manifest)

    summary = _summary(cfg, spec, folder, manifests, mode)
    files = write_results(folder, summary)
    click.echo("\n" + (folder / "results.md").read_text().split("\n\n![")[0])
    done(f"sweep '{spec.name}' done in {clock(time.time() - started)}: {files['markdown']}, {files['html']}")
    return SweepResult(folder, summary["trials"], summary["storage"], files)


def _shared_inputs(cfg) -> None:
    """The run's base, data and quantized base, made as `make quantize` makes them when missing."""
    from .p01_prepare_data import prepare_data
    from .p02_fetch_base_model import fetch_base_model
    from .p03_quantize_base_model import quantize_base_model

    paths = RunPaths(cfg)
    needed = [(paths.base, fetch_base_model), (paths.data, prepare_data)]  # 01 counts tokens with 02's tokenizer
    if cfg.quantize.enabled:
        needed.append((paths.quantized, quantize_base_model))
    for folder, phase in needed:
        if not (folder / MANIFEST).is_file():
            click.echo(f"{folder} is missing: making it first (shared by every trial)")
            phase(cfg)


def _remove_leftovers(folder: Path) -> None:
    """Temporary fused models of a killed --merge, and temporaries of interrupted writes."""
    for p in folder.glob(MERGE_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)
    clean_stale(folder)


def _run_trial(cfg, trial: Trial, folder: Path, mode: str, prefix: str, eta: str,
               keep_checkpoints: bool) -> tuple[dict, bool]:
    """(the trial's manifest, whether anything ran)."""
    tdir = folder / trial.id
    tcfg = trial_config(cfg, trial)
    paths = TrialPaths(tcfg, tdir)
    finished = _read(tdir / MANIFEST)
    if finished and finished.get("config") == tcfg.to_dict() and finished.get("mode") == mode:
        click.secho(f"{prefix}: finished earlier, skipped ({tdir}/)", fg="cyan")
        return finished, False
    click.secho(f"\n{prefix}: {eta}", bold=True)
    started = time.time()
    if (tdir / MANIFEST).exists():
        (tdir / MANIFEST).unlink()  # its result no longer stands: other settings or another eval mode
    trained = _read(paths.adapters / MANIFEST)
    if trained and _same_training(trained.get("config", {}), tcfg.to_dict()):
        click.echo(f"{prefix}: adapter trained earlier ({paths.adapters}/), evaluating it ({_mode_text(mode)})")
    else:
        if trained:
            click.echo(f"{prefix}: {paths.adapters}/ was trained with other settings; training again")
            shutil.rmtree(paths.adapters)
        _train(tcfg, paths, prefix)
        click.echo(f"{prefix}: trained in {clock(time.time() - started)}, evaluating ({_mode_text(mode)})")
    train_seconds = time.time() - started
    merge = _merge_and_evaluate(tcfg, trial, folder, paths) if mode == "merged" else None
    if merge is None:
        from .p05_evaluate import evaluate

        evaluate(tcfg, skip_base=True, paths=paths)
    if not keep_checkpoints:  # adapter-only storage: the trial is scored, its last and best adapters stay
        shutil.rmtree(paths.adapters / CHECKPOINTS, ignore_errors=True)
    return _write_trial_manifest(tcfg, trial, tdir, paths, mode, merge, started, train_seconds), True


def _same_training(recorded: dict, wanted: dict) -> bool:
    """What the adapter depends on: the train section and the seed."""
    return recorded.get("train") == wanted["train"] and recorded.get("seed") == wanted["seed"]


def _train(tcfg, paths: TrialPaths, prefix: str) -> None:
    from .p04_train_lora import train_lora

    partial = paths.root / ".adapters.partial"
    if complete_checkpoints(partial / CHECKPOINTS):
        click.echo(f"{prefix}: resuming the interrupted training in {partial}/")
        try:
            train_lora(tcfg, resume=True, paths=paths)
            return
        except TrainingInterrupted:
            raise
        except PipelineError as e:  # its checkpoint no longer fits (settings, base or data changed)
            click.secho(f"{prefix}: cannot resume ({e}); training from the start", fg="yellow")
    train_lora(tcfg, paths=paths)


def _merge_and_evaluate(tcfg, trial: Trial, folder: Path, paths: TrialPaths) -> dict:
    """B1: fuse at full precision into a temporary folder of the sweep, score it, delete it."""
    from .p05_evaluate import evaluate
    from .p07_fuse_lora import fuse

    tmp = folder / f"{MERGE_PREFIX}{trial.id}"
    # Full precision, like a full checkpoint: a --no-dequantize fuse can round a small adapter away.
    fcfg = dataclasses.replace(tcfg, fuse=dataclasses.replace(tcfg.fuse, dequantize=True, rebase=False, strict=False))
    try:
        fuse(fcfg, paths=TrialPaths(fcfg, paths.root, merged=tmp))
        temp_bytes = disk_usage(tmp)["total_bytes"]
        evaluate(tcfg, skip_base=True, paths=paths, fused=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        clean_stale(folder)
    click.echo(f"temporary fused model: {human_size(temp_bytes)} in {tmp}/, deleted "
               f"({'gone' if not tmp.exists() else 'STILL THERE'})")
    return {"temp_path": str(tmp), "temp_bytes": temp_bytes, "dtype": tcfg.fuse.dtype, "deleted": not tmp.exists()}


def _write_trial_manifest(tcfg, trial: Trial, tdir: Path, paths: TrialPaths, mode: str, merge: dict | None,
                          started: float, train_seconds: float) -> dict:
    trained = read_manifest(paths.adapters, "train", verify=False)
    evaluated = json.loads((paths.eval / "results.json").read_text())
    choice = paths.adapter_choice
    base_hash = read_manifest(paths.train_base, "quantize" if tcfg.quantize.enabled else "base",
                              verify=False)["outputs"]["content_hash"]
    extra = dict(
        id=trial.id, index=trial.index, label=trial.label, values=trial.values, settings=trial.settings, mode=mode,
        result={**evaluated["adapter"], "primary_metric": evaluated["primary_metric"],
                "scored_rows": evaluated["scored_rows"], "test_rows": evaluated["test_rows"]},
        best=(trained.get("result") or {}).get("best"),
        trainable_parameters=trained["result"]["parameters"]["trainable"],
        adapter_bytes=choice.file.stat().st_size,
        checkpoint_bytes=disk_usage(paths.adapters / CHECKPOINTS)["total_bytes"]
        if (paths.adapters / CHECKPOINTS).is_dir() else 0,
        trial_bytes=disk_usage(tdir)["total_bytes"],
        merge=merge,
        train_seconds=round(train_seconds, 1),
        seconds=round(time.time() - started, 1),
    )
    write_manifest(tdir, PHASE, tcfg, started,
                   inputs={"base": {"path": str(paths.train_base), "content_hash": base_hash},
                           "test_sha256": sha256_file(paths.data / "test.jsonl")},
                   outputs={"adapter": {"path": str(choice.file), "sha256": sha256_file(choice.file)},
                            "eval": str(paths.eval / "results.json")},
                   **extra)
    return json.loads((tdir / MANIFEST).read_text())


def _summary(cfg, spec, folder: Path, manifests: list[dict], mode: str) -> dict:
    run = RunPaths(cfg)
    primary = next((m["result"].get("primary_metric") for m in manifests if m["result"].get("primary_metric")), None)
    for m in manifests:  # as they are now: a skipped trial's folder is measured again
        m["trial_bytes"] = disk_usage(folder / m["id"])["total_bytes"]
    s = storage(folder, manifests, run.base, run.quantized, cfg.fuse.dtype)
    trials = [{k: m.get(k) for k in ("index", "id", "label", "values", "settings", "mode", "result", "best",
                                     "trainable_parameters", "adapter_bytes", "checkpoint_bytes", "trial_bytes",
                                     "merge", "train_seconds", "seconds")} for m in manifests]
    scored = [t for t in trials if primary and t["result"].get("metric", {}).get(primary) is not None]
    best = (max(scored, key=lambda t: (t["result"]["metric"][primary], -t["result"]["test_loss"])) if scored
            else min(trials, key=lambda t: t["result"]["test_loss"]))
    for line in storage_lines(s):
        click.echo(line)
    return {"sweep": spec.name, "run": cfg.run, "source": str(spec.source), "mode": mode,
            "mode_text": _mode_text(mode), "primary_metric": primary, "best": best["id"],
            "eval_max_samples": cfg.eval.max_samples, "trials": trials, "storage": s}


def _mode_text(mode: str) -> str:
    return ("B1: merged into a temporary full-precision model, deleted after scoring" if mode == "merged"
            else "B2: the adapter loaded on the training base, no merge")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
