"""What every phase does first: say what it is, print its resolved config, clear crash leftovers."""

from __future__ import annotations

import time

import click

from ..config import Config, format_config
from ..fsio import clean_stale
from ..paths import RunPaths
from ..runtime import device_banner


def start_phase(cfg: Config, title: str, sections: list[str], given: dict | None = None) -> float:
    """`given`: the paths of the guides' form (no run folder: nothing of models/<run>/ is touched)."""
    if given:
        click.secho(f"== {title} ({', '.join(f'{k} {v}' for k, v in given.items())}) ==", bold=True)
    else:
        click.secho(f"== {title} (run '{cfg.run}') ==", bold=True)
    device, warning = device_banner(cfg.train.compute_dtype)
    click.echo(device)
    if warning:
        click.secho(warning, fg="yellow", err=True)
    click.echo("resolved config:")
    click.echo(format_config(cfg, sections, run_keys=not given))
    if not given:
        clean_run_folder(cfg)
    return time.time()


def clean_run_folder(cfg: Config) -> None:
    """Temporaries of an interrupted run (its process is gone) in the run folder and its phase
    folders; each write also cleans its own folder (fsio.atomic_path)."""
    root = RunPaths(cfg).root
    folders = [root, *(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))] if root.is_dir() else []
    cleaned = [p for f in folders for p in clean_stale(f)]
    if cleaned:
        click.echo(f"cleaned up {len(cleaned)} leftover(s) of an interrupted run: "
                   + ", ".join(str(p) for p in cleaned))


def done(message: str) -> None:
    click.secho(message, fg="green")
