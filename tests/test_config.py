"""The experiment config: precedence CLI > env > YAML > default, validation messages, shipped
configs, and the click commands generated from the same declarations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import pipeline.cli as cli
from pipeline.config import KEYS, TEST_MODE_VALUES, Config, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
ENV_NAMES = sorted({f.metadata["env"] for f in KEYS.values() if f.metadata["env"]} | {"USE_LORA"})


def write_yaml(tmp_path: Path, data, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --- precedence -------------------------------------------------------------------------------


def test_defaults(fresh_env):
    cfg = load_config(None, None, env=fresh_env)
    assert isinstance(cfg, Config)
    assert cfg.train.rank == 8
    assert cfg.train.fine_tune_type == "lora"
    assert cfg.quantize.bits == 4
    assert cfg.train.targets == ["attention", "mlp"]
    assert cfg.test_mode is False
    assert cfg.run_dir == Path("models") / "demo"


def test_yaml_overrides_default(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"run": "exp1", "train": {"rank": 4, "targets": ["attention"]},
                                 "quantize": {"bits": 8}})
    cfg = load_config(path, None, env=fresh_env)
    assert (cfg.run, cfg.train.rank, cfg.quantize.bits) == ("exp1", 4, 8)
    assert cfg.train.targets == ["attention"]
    assert cfg.train.alpha == 16.0  # untouched keys keep their default


def test_env_overrides_yaml(tmp_path):
    path = write_yaml(tmp_path, {"train": {"rank": 4, "alpha": 8, "dropout": 0.0}})
    cfg = load_config(path, None, env={"LORA_RANK": "16", "LORA_ALPHA": "32", "LORA_DROPOUT": "0.05"})
    assert cfg.train.rank == 16
    assert cfg.train.alpha == 32.0
    assert cfg.train.dropout == pytest.approx(0.05)


def test_env_overrides_default(fresh_env):
    cfg = load_config(None, None, env={"LORA_RANK": "2", "QUANTIZE": "false", "RUN": "x"})
    assert (cfg.train.rank, cfg.quantize.enabled, cfg.run) == (2, False, "x")


def test_cli_overrides_env_and_yaml(tmp_path):
    path = write_yaml(tmp_path, {"train": {"rank": 4}})
    cfg = load_config(path, {"train.rank": 32}, env={"LORA_RANK": "16"})
    assert cfg.train.rank == 32


def test_cli_overrides_default(fresh_env):
    cfg = load_config(None, {"quantize.group_size": 32, "train.targets": "attention,lm_head"}, env=fresh_env)
    assert cfg.quantize.group_size == 32
    assert cfg.train.targets == ["attention", "lm_head"]


def test_each_layer_in_turn(tmp_path):
    """default < YAML < env < CLI, one layer added at a time on the same key."""
    path = write_yaml(tmp_path, {"train": {"rank": 4}})
    assert load_config(None, None, env={}).train.rank == 8
    assert load_config(path, None, env={}).train.rank == 4
    assert load_config(path, None, env={"LORA_RANK": "16"}).train.rank == 16
    assert load_config(path, {"train.rank": 32}, env={"LORA_RANK": "16"}).train.rank == 32


def test_cli_none_does_not_shadow_yaml(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"train": {"rank": 4}, "quantize": {"enabled": False}})
    cfg = load_config(path, {"train.rank": None, "quantize.enabled": None}, env=fresh_env)
    assert cfg.train.rank == 4
    assert cfg.quantize.enabled is False


def test_empty_env_var_is_ignored(tmp_path):
    path = write_yaml(tmp_path, {"train": {"rank": 4}})
    assert load_config(path, None, env={"LORA_RANK": ""}).train.rank == 4


def test_env_none_reads_os_environ(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORA_RANK", "12")
    assert load_config(None, None).train.rank == 12


# --- USE_LORA and TEST_MODE -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "off"])
def test_use_lora_off_means_full(value, fresh_env):
    assert load_config(None, None, env={"USE_LORA": value}).train.fine_tune_type == "full"


def test_use_lora_on_keeps_dora(tmp_path):
    path = write_yaml(tmp_path, {"train": {"fine_tune_type": "dora"}})
    assert load_config(path, None, env={"USE_LORA": "1"}).train.fine_tune_type == "dora"
    assert load_config(path, None, env={"USE_LORA": "true"}).train.fine_tune_type == "dora"


def test_use_lora_on_turns_full_into_lora(tmp_path):
    path = write_yaml(tmp_path, {"train": {"fine_tune_type": "full"}})
    assert load_config(path, None, env={"USE_LORA": "1"}).train.fine_tune_type == "lora"


def test_flag_beats_use_lora():
    cfg = load_config(None, {"train.fine_tune_type": "dora"}, env={"USE_LORA": "0"})
    assert cfg.train.fine_tune_type == "dora"


def test_use_lora_bad_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, None, env={"USE_LORA": "maybe"})
    assert "USE_LORA" in str(e.value) and "'maybe'" in str(e.value)


def test_test_mode_env_shrinks_iters(fresh_env):
    normal = load_config(None, None, env=fresh_env)
    cfg = load_config(None, None, env={"TEST_MODE": "1"})
    assert cfg.test_mode is True
    assert cfg.train.iters == TEST_MODE_VALUES["train.iters"] < normal.train.iters
    assert cfg.eval.max_samples == TEST_MODE_VALUES["eval.max_samples"]
    assert cfg.train.save_every == TEST_MODE_VALUES["train.save_every"]


def test_test_mode_from_yaml_shrinks_yaml_iters(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"test_mode": True, "train": {"iters": 500}})
    assert load_config(path, None, env=fresh_env).train.iters == TEST_MODE_VALUES["train.iters"]


def test_test_mode_keeps_smaller_values(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"test_mode": True, "train": {"iters": 2}})
    assert load_config(path, None, env=fresh_env).train.iters == 2


def test_test_mode_shrinks_env_iters():
    assert load_config(None, None, env={"TEST_MODE": "1", "ITERS": "50"}).train.iters == 6


def test_flag_iters_survives_test_mode():
    cfg = load_config(None, {"train.iters": 40}, env={"TEST_MODE": "1"})
    assert cfg.train.iters == 40
    assert cfg.train.save_every == TEST_MODE_VALUES["train.save_every"]  # others still shrink


def test_test_mode_off_flag_beats_env():
    cfg = load_config(None, {"test_mode": False}, env={"TEST_MODE": "1"})
    assert cfg.test_mode is False
    assert cfg.train.iters == 200


# --- errors -----------------------------------------------------------------------------------


def test_unknown_yaml_key_names_it_and_lists_allowed(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"train": {"rnk": 4}})
    with pytest.raises(ConfigError) as e:
        load_config(path, None, env=fresh_env)
    msg = str(e.value)
    assert "train.rnk" in msg
    assert str(path) in msg
    for allowed in ("train.rank", "quantize.bits", "data.overlong", "run"):
        assert allowed in msg


def test_unknown_top_level_key(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"trian": {"rank": 4}})
    with pytest.raises(ConfigError, match="trian"):
        load_config(path, None, env=fresh_env)


@pytest.mark.parametrize(
    "data, key, bad, allowed",
    [
        ({"quantize": {"bits": 3}}, "quantize.bits", "3", ["4", "8"]),
        ({"quantize": {"group_size": 16}}, "quantize.group_size", "16", ["32", "64", "128"]),
        ({"data": {"overlong": "skip"}}, "data.overlong", "'skip'", ["drop", "truncate", "error"]),
        ({"train": {"fine_tune_type": "qlora"}}, "train.fine_tune_type", "'qlora'", ["lora", "dora", "full"]),
        ({"train": {"compute_dtype": "fp8"}}, "train.compute_dtype", "'fp8'", ["float32", "bfloat16"]),
        ({"model": {"dtype": "int8"}}, "model.dtype", "'int8'", ["auto", "float32"]),
    ],
)
def test_bad_choice_names_key_value_and_allowed(tmp_path, fresh_env, data, key, bad, allowed):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path, None, env=fresh_env)
    msg = str(e.value)
    assert key in msg and bad in msg, msg
    for a in allowed:
        assert a in msg, msg


@pytest.mark.parametrize(
    "env, key, bad, hint",
    [
        ({"LORA_RANK": "abc"}, "train.rank", "'abc'", "int"),
        ({"LORA_RANK": "0"}, "train.rank", "'0'", ">= 1"),
        ({"LORA_ALPHA": "lots"}, "train.alpha", "'lots'", "float"),
        ({"LORA_DROPOUT": "1.5"}, "train.dropout", "'1.5'", "<= 0.9"),
        ({"QUANTIZE": "perhaps"}, "quantize.enabled", "'perhaps'", "bool"),
        ({"ITERS": "2.5"}, "train.iters", "'2.5'", "int"),
    ],
)
def test_bad_env_value_names_variable_key_and_expectation(env, key, bad, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, None, env=env)
    msg = str(e.value)
    (name,) = env
    assert key in msg and bad in msg and name in msg and hint in msg, msg


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"rank": 4.5}}, "train.rank"),
        ({"train": {"rank": True}}, "train.rank"),
        ({"train": {"mask": "sometimes"}}, "train.mask"),
        ({"train": {"targets": []}}, "train.targets"),
        ({"data": {"valid_fraction": 0.9}}, "data.valid_fraction"),
        ({"train": {"rank": None}}, "train.rank"),
    ],
)
def test_bad_yaml_value(tmp_path, fresh_env, data, key):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(path, None, env=fresh_env)


def test_yaml_int_like_float_is_accepted(tmp_path, fresh_env):
    path = write_yaml(tmp_path, {"train": {"rank": 4.0}})
    assert load_config(path, None, env=fresh_env).train.rank == 4


def test_bad_cli_value_names_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"quantize.bits": 5}, env={})
    assert "quantize.bits" in str(e.value) and "command line" in str(e.value)


def test_unknown_cli_key():
    with pytest.raises(ConfigError, match="train.rnk"):
        load_config(None, {"train.rnk": 4}, env={})


def test_missing_yaml_file(tmp_path, fresh_env):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(missing, None, env=fresh_env)
    assert str(missing) in str(e.value)


def test_invalid_yaml_syntax(tmp_path, fresh_env):
    path = write_yaml(tmp_path, "train: {rank: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, None, env=fresh_env)


@pytest.mark.parametrize("text", ["- a\n- b\n", "train: 4\n"])
def test_yaml_wrong_shape(tmp_path, fresh_env, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError):
        load_config(path, None, env=fresh_env)


def test_empty_yaml_means_defaults(tmp_path, fresh_env):
    path = write_yaml(tmp_path, "")
    assert load_config(path, None, env=fresh_env) == load_config(None, None, env=fresh_env)


# --- shipped configs --------------------------------------------------------------------------


def test_configs_are_shipped():
    assert SHIPPED, f"no configs/*.yaml under {REPO / 'configs'}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_validates(path, fresh_env):
    """torchtune-style: every shipped config loads, and so does its TEST_MODE form."""
    cfg = load_config(path, None, env=fresh_env)
    assert cfg.to_dict()
    smoke = load_config(path, None, env={"TEST_MODE": "1"})
    assert smoke.train.iters <= TEST_MODE_VALUES["train.iters"]


# --- the CLI, generated from the same declarations --------------------------------------------


def flag_for(key: str) -> str:
    return cli.FLAG_NAMES.get(key, "--" + key.split(".")[-1].replace("_", "-"))


def test_command_table_matches_cli():
    assert set(cli.main.commands) == set(cli.COMMANDS) | {"inspect"}  # inspect takes paths, not a config
    for name, (target, _sections, keys, summary) in cli.COMMANDS.items():
        assert ":" in target, name
        assert summary, name
        for key in keys:
            assert key in KEYS, f"{name} exposes unknown key {key}"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_help_lists_every_flag(name):
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    keys = cli.COMMON + cli.COMMANDS[name][2]
    for key in keys:
        assert flag_for(key) in text, f"{name} --help lacks {flag_for(key)} for {key}"
        env = KEYS[key].metadata["env"]
        if env:
            assert f"env {env}" in text, f"{name} --help does not mention {env}"
    assert "--config" in text


def test_main_help_lists_commands():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in cli.COMMANDS:
        assert name in result.output


def test_click_options_left_out_do_not_override_yaml(tmp_path, monkeypatch):
    """Run a real click command; only the phase function is replaced, to capture its config."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    seen = {}
    monkeypatch.setattr(cli, "_call", lambda target, cfg, **kw: seen.setdefault("cfg", cfg))
    path = write_yaml(tmp_path, {"train": {"rank": 4, "alpha": 8, "mask": "none"},
                                 "quantize": {"enabled": False}})
    result = CliRunner().invoke(cli.main, ["train", "--config", str(path), "--iters", "3"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.train.rank, cfg.train.alpha, cfg.train.iters) == (4, 8.0, 3)
    assert cfg.train.mask == "none" and cfg.quantize.enabled is False


def test_cli_config_error_exits_2(tmp_path, monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "_call", lambda target, cfg, **kw: None)
    path = write_yaml(tmp_path, {"quantize": {"bits": 3}})
    result = CliRunner().invoke(cli.main, ["quantize", "--config", str(path)])
    assert result.exit_code == 2
    assert "quantize.bits" in result.output and "4, 8" in result.output
