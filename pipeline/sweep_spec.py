"""The `sweep:` block of a YAML: which trials a sweep runs, checked before any work.

    sweep:
      name: rank-lr                 # folder models/<run>/sweeps/<name>/ (default: the YAML file's stem)
      grid:                         # every combination of these values
        train.rank: [8, 16]
        train.learning_rate: [1.0e-4, 2.0e-4]
      runs:                         # and/or trials listed one by one (after the grid's)
        - {train.rank: 32, train.scale: 2.0}
      fixed:                        # the same in every trial, over the run's config
        train.iters: 60

Keys are config keys (pipeline/config.py), plus `train.scale`: the LoRA scale alpha / rank (the
trial's alpha is scale x rank). Only what an adapter depends on varies (train.* and seed): the base,
the quantized base and the data are shared by every trial, and every trial is scored alike (eval.*).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import KEYS, SPECIAL_ENV, coerce, read_yaml
from .errors import ConfigError

SCALE = "train.scale"
PARTS = ("name", "grid", "runs", "fixed")
# Training settings a trial cannot take: they leave the one-process adapter training of a sweep.
NOT_SWEPT = {"train.nproc": "data-parallel training", "train.hosts": "multi-machine training",
             "train.distributed_backend": "data-parallel training"}
SHORT = {"train.learning_rate": "lr", "train.fine_tune_type": "type", "train.min_learning_rate": "min_lr",
         "train.grad_accumulation_steps": "accum", "train.early_stopping_patience": "patience"}
EXAMPLE = "sweep: {grid: {train.rank: [8, 16], train.learning_rate: [1.0e-4, 2.0e-4]}} (see configs/sweep.yaml)"


@dataclass
class Trial:
    index: int  # 1-based, in the order the trials run
    values: dict  # what this trial sets itself (grid / runs), by config key
    fixed: dict = field(default_factory=dict)

    @property
    def settings(self) -> dict:
        return {**self.fixed, **self.values}

    @property
    def id(self) -> str:
        """Its folder name, from its own values (so editing the grid keeps finished trials' folders)."""
        slug = "_".join(f"{short(k)}{_text(v)}" for k, v in self.values.items()) or "default"
        slug = re.sub(r"[^A-Za-z0-9.=+_-]", "-", slug)
        if len(slug) > 64:
            slug = slug[:52] + "-" + hashlib.sha256(slug.encode()).hexdigest()[:8]
        return slug

    @property
    def label(self) -> str:
        """rank=16, lr=0.0001"""
        return ", ".join(f"{short(k)}={_text(v)}" for k, v in self.values.items()) or "the config's settings"


@dataclass
class Sweep:
    name: str
    source: Path
    trials: list[Trial]


def short(key: str) -> str:
    return SHORT.get(key, key.split(".")[-1])


def _text(v) -> str:
    if isinstance(v, list):
        return "+".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def read_block(path: str | os.PathLike, own_config: bool) -> Mapping:
    """The `sweep:` block of `path`. `own_config`: the file is also the run's config (its other
    keys are config keys); a separate --sweep file holds the block alone."""
    path = Path(path)
    data = read_yaml(path, "Sweep file", "Pass an existing YAML with --sweep (see configs/sweep.yaml).")
    if not isinstance(data, Mapping) or "sweep" not in data:
        raise ConfigError(f"{path} has no top-level `sweep:` block. Add one, e.g. {EXAMPLE}.")
    others = sorted(str(k) for k in data if k != "sweep")
    if others and not own_config:
        raise ConfigError(f"{path}: a --sweep file holds only the `sweep:` block, found also {', '.join(others)}. "
                          "Put settings shared by every trial under sweep.fixed, or in the --config YAML.")
    if not isinstance(data["sweep"], Mapping):
        raise ConfigError(f"{path}: `sweep:` must be a mapping with grid: and/or runs:, e.g. {EXAMPLE}.")
    return data["sweep"]


def parse_sweep(block: Mapping, source: str | os.PathLike, env: Mapping[str, str] | None = None,
                name: str | None = None) -> Sweep:
    """Validate the block and list its trials; every error names the key and the fix."""
    env = os.environ if env is None else env
    where = f"{source}: sweep"
    unknown = sorted(str(k) for k in block if k not in PARTS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown part of the sweep block; use {', '.join(PARTS)}.")
    name = str(name or block.get("name") or Path(source).stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", name):
        raise ConfigError(f"{where}.name = {name!r}: a folder name is needed (letters, digits, . _ -).")
    grid = _mapping(block.get("grid"), f"{where}.grid")
    runs = block.get("runs") or []
    if not isinstance(runs, list):
        raise ConfigError(f"{where}.runs: must be a list of trials, e.g. runs: [{{train.rank: 32}}].")
    fixed = {k: _value(k, v, f"{where}.fixed") for k, v in _mapping(block.get("fixed"), f"{where}.fixed").items()}

    axes = {}
    for k, values in grid.items():
        if not isinstance(values, list):
            raise ConfigError(f"{where}.grid.{k} = {values!r}: a list of values is needed, e.g. {k}: [{values!r}].")
        if not values:
            raise ConfigError(f"{where}.grid.{k} is an empty list: no trial would run. List at least one value, "
                              f"or remove {k}.")
        if k in fixed:
            raise ConfigError(f"{where}: {k} is both in grid (swept) and in fixed ({fixed[k]!r}); keep it in one.")
        axes[k] = [_value(k, v, f"{where}.grid") for v in values]
    listed = []
    for i, run in enumerate(runs, 1):
        run = _mapping(run, f"{where}.runs[{i}]")
        for k in run:
            if k in fixed:
                raise ConfigError(f"{where}.runs[{i}]: {k} is also in fixed ({fixed[k]!r}); keep it in one.")
        listed.append({k: _value(k, v, f"{where}.runs[{i}]") for k, v in run.items()})
    if not axes and not listed:
        raise ConfigError(f"{where}: no trials: give grid: and/or runs:, e.g. {EXAMPLE}.")

    combos = [dict(zip(axes, c)) for c in itertools.product(*axes.values())] if axes else []
    trials = [Trial(i, values, fixed) for i, values in enumerate(combos + listed, 1)]
    seen: dict[str, Trial] = {}
    for t in trials:
        settings = t.settings
        if SCALE in settings and "train.alpha" in settings:
            raise ConfigError(f"{where}: trial {t.index} ({t.label}) sets both train.alpha and train.scale "
                              "(scale = alpha / rank); give one of them.")
        if settings.get("train.fine_tune_type") == "full":
            raise ConfigError(f"{where}: train.fine_tune_type full trains every weight, but a sweep keeps adapters "
                              "only; sweep lora or dora.")
        key = json.dumps(settings, sort_keys=True)
        if key in seen or t.id in {s.id for s in seen.values()}:
            other = seen.get(key) or next(s for s in seen.values() if s.id == t.id)
            raise ConfigError(f"{where}: trials {other.index} and {t.index} are the same ({t.label}); "
                              "remove one (runs: may repeat a grid combination).")
        seen[key] = t
    _check_env(trials, env, where)
    return Sweep(name, Path(source), trials)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping of config keys to values, e.g. train.rank: 8.")
    return {str(k): v for k, v in value.items()}


def _value(key: str, value, where: str):
    """One value, converted and range-checked as the config does; the key must be one a trial may change."""
    if key == SCALE:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}.{key} = {value!r}: a positive number is needed (alpha = scale x rank).")
        return float(value)
    if key not in KEYS:
        aliases = {f"{k.split('.')[0]}.{v}": k for k, v in SHORT.items()}  # train.lr: the table's own names
        close = [aliases[key]] if key in aliases else difflib.get_close_matches(key, [*KEYS, SCALE], n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}.{key}: unknown config key.{hint} Sweepable keys: train.* (see "
                          f"`mlx-pipeline train --help`), {SCALE}, seed.")
    if key in NOT_SWEPT:
        raise ConfigError(f"{where}.{key}: a sweep trains each adapter in one process ({NOT_SWEPT[key]} is "
                          "not swept); remove it.")
    if not (key.startswith("train.") or key == "seed"):
        why = ("every trial is scored alike: set it in the config or with its flag" if key.startswith("eval.") else
               "every trial shares one base, quantized base and data: make another run (RUN=...) for it")
        raise ConfigError(f"{where}.{key}: not sweepable ({why}). Sweepable keys: train.*, {SCALE}, seed.")
    return coerce(key, value, where)


def _check_env(trials: list[Trial], env: Mapping[str, str], where: str) -> None:
    """An environment variable for a key the sweep sets would be silently overridden: refuse it."""
    keys = {k for t in trials for k in t.settings}
    if SCALE in keys:
        keys.add("train.alpha")
    for k in sorted(keys):
        names = [KEYS[k].metadata["env"]] if k in KEYS else []
        names += [n for n, (target, _) in SPECIAL_ENV.items() if target == k]
        for name in names:
            if name and env.get(name, "") != "":
                raise ConfigError(f"{where} sets {k}, and so does the environment ({name}={env[name]}); the sweep's "
                                  f"value wins in every trial. Unset {name} (e.g. `env -u {name} make sweep`).")


def trial_config(cfg, trial: Trial):
    """The run's config with the trial's settings over it (they win over flags, environment and YAML:
    `_check_env` refuses the environment variables they would silently override)."""
    settings = dict(trial.settings)
    scale = settings.pop(SCALE, None)
    top = {k: v for k, v in settings.items() if "." not in k}
    sections: dict[str, dict] = {}
    for k, v in settings.items():
        if "." in k:
            section, name = k.split(".", 1)
            sections.setdefault(section, {})[name] = v
    replaced = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()}
    new = dataclasses.replace(cfg, **top, **replaced)
    if scale is not None:
        new = dataclasses.replace(new, train=dataclasses.replace(new.train, alpha=scale * new.train.rank))
    return new
