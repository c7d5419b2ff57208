"""What every phase does first: say what it is and print its resolved config."""

from __future__ import annotations

import time

import click

from ..config import Config, format_config


def start_phase(cfg: Config, title: str, sections: list[str]) -> float:
    click.secho(f"== {title} (run '{cfg.run}') ==", bold=True)
    click.echo("resolved config:")
    click.echo(format_config(cfg, sections))
    return time.time()


def done(message: str) -> None:
    click.secho(message, fg="green")
