"""`mlx-pipeline`: one click command per phase. Commands only parse and call the phase function.

Options are generated from the config declarations in pipeline/config.py and default to None,
so an option not given never shadows the YAML or the environment.
"""

from __future__ import annotations

import importlib
import sys

import click

from .config import KEYS, _type_name, default_of, load_config
from .errors import PipelineError

# command -> (module:function, config sections shown, config keys exposed as flags, summary)
COMMON = ["run", "output_dir", "seed", "test_mode"]
COMMANDS = {
    "data": (
        "pipeline.phases.p01_prepare_data:prepare_data",
        ["data"],
        ["data.source", "data.sample_rows", "data.valid_fraction", "data.test_fraction",
         "data.max_seq_length", "data.overlong"],
        "01 Validate, deduplicate and split JSONL data; token statistics.",
    ),
    "base": (
        "pipeline.phases.p02_fetch_base_model:fetch_base_model",
        ["model"],
        ["model.source", "model.revision", "model.dtype"],
        "02 Fetch the base model (Hub, local folder, GGUF import, embedded default).",
    ),
    "quantize": (
        "pipeline.phases.p03_quantize_base_model:quantize_base_model",
        ["quantize"],
        ["quantize.bits", "quantize.group_size"],
        "03 Quantize the base with MLX affine quantization (for QLoRA).",
    ),
    "train": (
        "pipeline.phases.p04_train_lora:train_lora",
        ["quantize", "train", "data"],
        ["quantize.enabled", "train.fine_tune_type", "train.rank", "train.alpha", "train.dropout",
         "train.targets", "train.num_layers", "train.iters", "train.batch_size", "train.learning_rate",
         "train.lr_schedule", "train.warmup_steps", "train.min_learning_rate",
         "train.mask_prompt", "train.steps_per_report", "train.steps_per_eval", "train.val_batches",
         "train.save_every", "train.keep_checkpoints", "train.grad_checkpoint", "train.compute_dtype"],
        "04 Train a LoRA / DoRA adapter or fully fine-tune, on the quantized (QLoRA) or full base.",
    ),
    "eval": (
        "pipeline.phases.p05_evaluate:evaluate",
        ["eval"],
        ["quantize.enabled", "eval.max_samples", "eval.max_tokens", "eval.show_samples"],
        "05 Base vs base + adapter: test loss, perplexity, task metric, sample answers.",
    ),
    "generate": (
        "pipeline.phases.p06_generate:generate",
        ["generate"],
        ["quantize.enabled", "generate.max_tokens", "generate.temperature"],
        "06 Chat with (or complete a prompt on) the base model plus the trained adapter.",
    ),
    "fuse": (
        "pipeline.phases.p07_fuse_lora:fuse",
        ["fuse"],
        ["quantize.enabled", "fuse.dequantize", "fuse.dtype", "fuse.rebase", "fuse.strict"],
        "07 Fuse the adapter into the base: --no-dequantize (default) keeps it quantized, --de-quantize writes full precision.",
    ),
    "hf": (
        "pipeline.phases.p08_convert_to_hf:convert_to_hf",
        ["export"],
        ["export.dtype", "export.max_shard_gb"],
        "08 Convert the fused MLX model to a Hugging Face folder transformers loads.",
    ),
    "gguf": (
        "pipeline.phases.p09_convert_to_gguf:convert_to_gguf",
        ["gguf"],
        ["gguf.outtype", "gguf.quantizations", "gguf.threads", "gguf.native", "gguf.adapter_gguf",
         "gguf.imatrix", "gguf.imatrix_chunks", "gguf.imatrix_chunk_tokens"],
        "09 Convert to GGUF with llama.cpp's converter, then Q8_0 / Q5_K_M / Q4_K_M with its quantizer.",
    ),
    "verify": (
        "pipeline.phases.p10_verify_gguf:verify_gguf",
        ["verify"],
        ["verify.max_rows", "verify.max_samples", "verify.f16_max_kl", "eval.max_tokens"],
        "10 Load every GGUF in llama.cpp and measure it against the MLX fused model.",
    ),
}

# Flags that would be ambiguous as the bare key name.
FLAG_NAMES = {
    "data.source": "--data",
    "model.source": "--model",
    "model.revision": "--revision",
    "model.dtype": "--dtype",
    "quantize.enabled": "--quantized",
    "eval.max_tokens": "--max-tokens",
    "generate.max_tokens": "--max-tokens",
    "fuse.dequantize": "--de-quantize",
    "fuse.dtype": "--dtype",
    "export.dtype": "--dtype",
    "gguf.quantizations": "--quantization",
    "verify.max_samples": "--max-samples",
}
# Spellings users already use (mlx-lm says --dequantize, our docs say --de-quantize).
FLAG_ALIASES = {"fuse.dequantize": ["--dequantize"], "gguf.native": ["--no-dequantize"]}


def _option(key: str):
    f = KEYS[key]
    meta, kind = f.metadata, _type_name(f)
    flag = FLAG_NAMES.get(key, "--" + key.split(".")[-1].replace("_", "-"))
    default = default_of(f)
    extra = []
    if meta["env"]:
        extra.append(f"env {meta['env']}")
    extra.append(f"YAML {key}")
    extra.append(f"default {default!r}")
    help_text = f"{meta['help']} [{'; '.join(extra)}]"
    dest = key.replace(".", "__")
    if kind == "bool":
        negate = lambda a: f"--{a[5:]}" if a.startswith("--no-") else f"--no-{a[2:]}"  # noqa: E731
        decls = [f"{a}/{negate(a)}" for a in [flag, *FLAG_ALIASES.get(key, [])]]
        return click.option(*decls, dest, default=None, help=help_text)
    if kind == "list":
        help_text += " Comma-separated."
    click_type = {"int": int, "float": float}.get(kind, str)
    if meta["choices"] is not None and kind != "list":
        click_type = click.Choice([str(c) for c in meta["choices"]])
    return click.option(flag, dest, type=click_type, default=None, help=help_text)


def _call(target: str, cfg, **kwargs):
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(cfg, **kwargs)


def make_command(name: str, extra_options=(), call_kwargs=lambda kw: {}):
    target, _sections, keys, summary = COMMANDS[name]

    def command(config, **kw):
        cli = {k.replace("__", "."): v for k, v in kw.items() if k.replace("__", ".") in KEYS}
        extra = {k: v for k, v in kw.items() if k.replace("__", ".") not in KEYS}
        try:
            cfg = load_config(config, cli)
            result = _call(target, cfg, **call_kwargs(extra))
        except PipelineError as e:
            code = getattr(e, "exit_code", 2)  # 130/143: training stopped by Ctrl-C/SIGTERM, resumable
            click.secho(f"error: {e}" if code == 2 else str(e), fg="red" if code == 2 else "yellow", err=True)
            sys.exit(code)
        return result

    command.__doc__ = summary
    command = click.option("--config", "-c", type=click.Path(dir_okay=False), default=None,
                           help="Experiment YAML (see configs/). Flags > environment > YAML > defaults.")(command)
    for key in reversed(COMMON + keys):
        command = _option(key)(command)
    for opt_decorator in extra_options:
        command = opt_decorator(command)
    return click.command(name, help=summary)(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mlx-pipeline")
def main():
    """Fine-tune an open LLM with MLX and ship it.

    Phases run in order; each writes models/<run>/<output>/manifest.json, which the next reads:

    \b
      base -> data -> quantize -> train -> eval / generate
      train -> fuse -> hf -> gguf -> verify
    """


main.add_command(make_command("data"))
main.add_command(make_command("base"))
main.add_command(make_command("quantize"))
main.add_command(make_command("train", [
    click.option("--resume", "resume", is_flag=True, default=False,
                 help="Continue exactly from the newest complete checkpoint of this run (weights, optimizer, "
                      "step, schedule, random state, data order); after a finished run, continue to a larger "
                      "--iters. Refused when the config, base model or data changed."),
    click.option("--force-resume", "force_resume", is_flag=True, default=False,
                 help="With --resume: continue even though the config, base model or data changed."),
], lambda kw: {"resume": kw["resume"] or kw["force_resume"], "force_resume": kw["force_resume"]}))
main.add_command(make_command("eval", [
    click.option("--skip-base", is_flag=True, default=False, help="Score only base + adapter."),
], lambda kw: {"skip_base": kw["skip_base"]}))
main.add_command(make_command("generate", [
    click.option("--prompt", "-p", default=None, help="One prompt to answer; omit for an interactive chat."),
    click.option("--no-adapter", is_flag=True, default=False, help="Use the base model alone."),
    click.option("--raw", is_flag=True, default=False, help="Complete the prompt as plain text, no chat template."),
], lambda kw: {"prompt": kw["prompt"], "use_adapter": not kw["no_adapter"], "raw": kw["raw"]}))
for _name in ("fuse", "hf", "gguf", "verify"):
    main.add_command(make_command(_name))


def entry():
    """Console script `mlx-pipeline`."""
    from .runtime import ensure_fast_blas

    ensure_fast_blas()
    main()


def run_script(name: str):
    """Entry point for scripts/phaseN-*/NN_*.py: the same command as `mlx-pipeline NAME`."""
    from .runtime import ensure_fast_blas

    ensure_fast_blas()
    main([name, *sys.argv[1:]], prog_name=sys.argv[0])


if __name__ == "__main__":
    entry()
