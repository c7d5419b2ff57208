"""11 Install the verified GGUF where LM Studio, Ollama and llama.cpp pick it up.

The file is chosen from 10 verify's report (pipeline/export_choice.py): by default the smallest one
within install.max_metric_drop points of the MLX model's task metric and install.max_kl.
- LM Studio: <lmstudio_dir>/<publisher>/<model>-GGUF/<model>-<TYPE>.gguf, a hard link when on the
  same filesystem, else a copy (atomic either way). LM Studio has no LoRA support: a base + LoRA
  pair is never installed there. On macOS the fused MLX folder also goes in as <model>-MLX.
- Ollama: models/<run>/install/ollama/ holds the GGUF (hard link) and a Modelfile: FROM, ADAPTER
  for a pair, TEMPLATE translated from the model's Jinja chat template (pipeline/ollama_template.py),
  PARAMETER stop, SYSTEM when training always used one system prompt; `ollama create` when ollama
  is on PATH.
- llama.cpp: the llama-server / llama-cli commands, printed.
models/<run>/install/manifest.json records what went where, so a re-install replaces it and
--uninstall removes exactly that.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import click

from .. import llamacpp
from ..errors import MissingInputError, PipelineError
from ..export_choice import Choice, choose_export
from ..fsio import atomic_path, human_size, write_text
from ..manifest import MANIFEST, read_manifest, write_manifest
from ..paths import RunPaths
from .common import done, start_phase


@dataclass
class InstallResult:
    choice: Choice | None
    installed: list[dict] = field(default_factory=list)  # {"target", "path"} of every file placed
    modelfile: Path | None = None
    commands: list[str] = field(default_factory=list)  # what the user can run next
    removed: list[str] = field(default_factory=list)


def install_model(cfg, type_name: str | None = None, file: str | None = None, force: bool = False,
                  dry_run: bool = False, uninstall: bool = False, lms: bool = False) -> InstallResult:
    started = start_phase(cfg, "11 install" + (" (dry run)" if dry_run else ""), ["install"])
    paths = RunPaths(cfg)
    folder = paths.root / "install"
    previous = read_manifest(folder, "install", verify=False) if (folder / MANIFEST).is_file() else None
    if uninstall:
        return _uninstall(cfg, folder, previous, dry_run)

    # Everything is decided (choice, folders checked, Modelfile text) before anything is placed.
    choice = choose_export(cfg, type_name, file, force)
    click.echo(f"chose {choice.gguf.name}{' + ' + choice.lora.name if choice.lora else ''}: {choice.reason}")
    name = model_name(cfg)
    result = InstallResult(choice)
    targets = cfg.install.targets
    plan = []  # (target, source file, destination)
    if "lmstudio" in targets:
        plan += _lmstudio_plan(cfg, choice, name, force, dry_run)
    system = _system_prompt(paths)
    ollama_dir = folder / "ollama"
    if "ollama" in targets:
        plan += [("ollama", f, ollama_dir / f.name) for f in choice.files]
        text, notes = modelfile(choice, system)
        for n in notes:
            click.secho(f"ollama: {n}", fg="yellow")
    stale = [p for p in _installed_paths(previous) if p not in {str(d) for _, _, d in plan}]

    if dry_run:
        for target, src, dst in plan:
            click.echo(f"would place {src} -> {dst} ({target})")
        for p in stale:
            click.echo(f"would remove the earlier install's {p}")
        if "ollama" in targets:
            click.echo(f"would write {ollama_dir / 'Modelfile'}:\n{text}")
    else:
        result.installed = _place_all(plan)
        if "ollama" in targets:
            result.modelfile = ollama_dir / "Modelfile"
            write_text(result.modelfile, text)
            click.echo(f"ollama: wrote {result.modelfile}")
        result.removed = _remove_files(stale, cfg)
        write_manifest(folder, "11_install_model", cfg, started,
                       inputs={"verify_report": str(paths.verify / "report.json"), "choice": choice.row,
                               "reason": choice.reason},
                       outputs={"installed": result.installed, "removed": result.removed,
                                "modelfile": str(result.modelfile) if result.modelfile else None,
                                "ollama_model": name.lower() if "ollama" in targets else None})
    # Other programs last: their failure leaves a complete, recorded install behind.
    if "lmstudio" in targets:
        result.commands += _lms_commands(cfg, name, lms and not dry_run)
    if "ollama" in targets:
        result.commands += _ollama_create(ollama_dir / "Modelfile", name.lower(), dry_run)
    if "llamacpp" in targets:
        result.commands += llamacpp_commands(choice, cfg.serve.port)
    if system:
        click.echo(f"\nThe model was trained with this system prompt; send it (Ollama's SYSTEM does):\n  {system!r}")
    click.echo("\nnext:\n" + "\n".join(f"  {c}" for c in result.commands))
    if not dry_run:
        done(f"installed {choice.type} of run '{cfg.run}'; record in {folder / MANIFEST}")
    return result


def _place_all(plan: list[tuple]) -> list[dict]:
    """Place every file; if one fails (disk full, permissions), take back the ones placed so far
    that were not there before, so no half install is left."""
    placed = []
    try:
        for target, src, dst in plan:
            existed = dst.exists()
            how = place(src, dst)
            placed.append(({"target": target, "path": str(dst), "how": how, "source": str(src)}, existed))
            click.echo(f"{target}: {dst} ({how}, {human_size(dst.stat().st_size)})")
    except BaseException:
        for entry, existed in placed:
            if not existed:
                Path(entry["path"]).unlink(missing_ok=True)
        raise
    return [entry for entry, _ in placed]


def model_name(cfg) -> str:
    name = cfg.install.model_name or cfg.run
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise PipelineError(f"install.model_name = {name!r}: a model name may not contain / \\ : or start with '.'.")
    return name


def place(src: Path, dst: Path) -> str:
    """Hard link `src` at `dst` when both are on one filesystem, else copy it; atomic either way."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    same_fs = os.stat(src).st_dev == os.stat(dst.parent).st_dev
    with atomic_path(dst, expected_bytes=None if same_fs else src.stat().st_size,
                     what=f"a copy of {src.name}") as tmp:
        try:
            os.link(src, tmp)
            return "hard link"
        except OSError:  # another filesystem, or one without hard links
            _copy_with_progress(src, tmp)
    return "copy"


def _copy_with_progress(src: Path, dst: Path) -> None:
    from tqdm import tqdm

    with open(src, "rb") as fin, open(dst, "wb") as fout, \
            tqdm(total=src.stat().st_size, unit="B", unit_scale=True, desc=f"copying {src.name}", leave=False) as bar:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)
            bar.update(len(chunk))


def _lmstudio_plan(cfg, choice: Choice, name: str, force: bool, dry_run: bool) -> list[tuple]:
    root = Path(cfg.install.lmstudio_dir).expanduser()
    _check_writable(root, "LM Studio's models folder", "LMSTUDIO_MODELS_DIR or install.lmstudio_dir", dry_run)
    merged = choice
    if choice.lora:  # LM Studio loads no LoRA: the best merged file goes there instead
        merged = choose_export(cfg, force=force, allow_pair=False)
        click.echo(f"LM Studio has no LoRA support: it gets {merged.gguf.name} ({merged.reason})")
    folder = root / cfg.install.publisher / f"{name}-GGUF"
    plan = [("lmstudio", merged.gguf, folder / merged.gguf.name)]
    if platform.system() == "Darwin":  # LM Studio's MLX engine (Apple Silicon) loads MLX folders
        fused = RunPaths(cfg).fused
        mlx = root / cfg.install.publisher / f"{name}-MLX"
        plan += [("lmstudio-mlx", f, mlx / f.name) for f in sorted(fused.iterdir()) if f.is_file()]
    return plan


def _check_writable(root: Path, what: str, setting: str, dry_run: bool) -> None:
    """Before anything is placed: a real write (root passes permission checks that others fail)."""
    try:
        if dry_run:  # write nothing: the nearest existing folder must at least be a writable folder
            existing = next(p for p in [root, *root.parents] if p.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise NotADirectoryError(f"{existing} is not a writable folder")
            return
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".mlx-pipeline-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"{what} {root} is not writable ({e.strerror or e}). Nothing was installed; set "
                            f"{setting} to a folder you can write (LM Studio: My Models > models folder).") from None


def _lms_commands(cfg, name: str, run: bool) -> list[str]:
    key = f"{cfg.install.publisher}/{name}-GGUF"
    if not shutil.which("lms"):
        return [f"LM Studio: open My Models, or with its CLI: lms load {key}"]
    cmd = ["lms", "load", key]
    if run:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"`{shlex.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
        click.echo(f"LM Studio loaded {key}")
    return [shlex.join(cmd)]


def _ollama_create(path: Path, tag: str, dry_run: bool) -> list[str]:
    """`ollama create` when ollama is on PATH; else the command to run."""
    create = ["ollama", "create", tag, "-f", str(path)]
    if dry_run or not shutil.which("ollama"):
        return [shlex.join(create), f"ollama run {tag}"]
    proc = subprocess.run(create, capture_output=True, text=True, cwd=path.parent)
    if proc.returncode != 0:
        raise PipelineError(f"the files are installed, but `{shlex.join(create)}` failed: "
                            f"{(proc.stderr or proc.stdout).strip()[-400:]} Run it again once ollama works.")
    click.echo(f"ollama: created {tag}")
    return [f"ollama run {tag}"]


def modelfile(choice: Choice, system: str | None) -> tuple[str, list[str]]:
    """Modelfile text for the chosen export (files referenced relative to the Modelfile's folder)."""
    from .. import ollama_template

    notes = []
    lines = [f"# mlx-pipeline 11 install: {choice.type}, chosen because: {choice.reason}",
             f"FROM ./{choice.gguf.name}"]
    if choice.lora:
        lines.append(f"ADAPTER ./{choice.lora.name}")
    meta = llamacpp.gguf_chat_metadata(choice.gguf)
    try:
        if not meta["template"]:
            raise PipelineError("the GGUF has no chat template")
        tmpl = ollama_template.to_ollama(meta["template"], meta["special_tokens"], meta["add_bos"])
        if '"""' in tmpl.template:
            raise PipelineError('the translated template contains """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{tmpl.template}"""')
        lines += [f'PARAMETER stop "{s}"' for s in tmpl.stops if '"' not in s]  # a quote would end the value
        notes += tmpl.warnings
    except PipelineError as e:
        notes.append(f"no TEMPLATE written ({e}); Ollama falls back to guessing from the GGUF's own template.")
        lines.append("# no TEMPLATE: " + str(e).replace("\n", " "))
    if system:
        if '"""' in system:
            notes.append('the training system prompt contains """: not written as SYSTEM; send it yourself.')
        else:
            lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n", notes


def llamacpp_commands(choice: Choice, port: int) -> list[str]:
    lora = ["--lora", str(choice.lora)] if choice.lora else []
    return [shlex.join(["llama-server", "-m", str(choice.gguf), *lora, "--jinja", "--port", str(port)]),
            shlex.join(["llama-cli", "-m", str(choice.gguf), *lora, "--jinja", "-cnv"])]


def _system_prompt(paths: RunPaths) -> str | None:
    from ..serve import training_system_prompt

    return training_system_prompt(paths.data) if paths.data.is_dir() else None


def _installed_paths(manifest: dict | None) -> list[str]:
    return [e["path"] for e in ((manifest or {}).get("outputs") or {}).get("installed", [])]


def _remove_files(files: list[str], cfg) -> list[str]:
    """Remove files an earlier install placed, and the folders that leaves empty (never others)."""
    removed = []
    stop = {Path(cfg.install.lmstudio_dir).expanduser().resolve(), RunPaths(cfg).root.resolve()}
    for p in map(Path, files):
        if p.is_file():
            p.unlink()
            removed.append(str(p))
        parent = p.parent
        while parent.resolve() not in stop and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return removed


def _uninstall(cfg, folder: Path, previous: dict | None, dry_run: bool) -> InstallResult:
    if previous is None:
        raise MissingInputError(f"Nothing to uninstall: {folder / MANIFEST} records no install of run '{cfg.run}'.")
    outputs = previous.get("outputs") or {}
    files = _installed_paths(previous) + ([outputs["modelfile"]] if outputs.get("modelfile") else [])
    if dry_run:
        for f in files:
            click.echo(f"would remove {f}")
        return InstallResult(None, removed=[])
    removed = _remove_files(files, cfg)
    tag = outputs.get("ollama_model")
    if tag and shutil.which("ollama"):
        subprocess.run(["ollama", "rm", tag.lower()], capture_output=True, text=True)
        click.echo(f"ollama: removed {tag.lower()}")
    (folder / MANIFEST).unlink()
    shutil.rmtree(folder, ignore_errors=True)  # only ever holds what install placed
    for f in removed:
        click.echo(f"removed {f}")
    done(f"uninstalled run '{cfg.run}' ({len(removed)} file(s))")
    return InstallResult(None, removed=removed)
