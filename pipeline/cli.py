"""`mlx-pipeline`: one click command per phase. Commands only parse and call the phase function.

Options are generated from the config declarations in pipeline/config.py and default to None,
so an option not given never shadows the YAML or the environment.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from .config import KEYS, default_of, load_config, type_name
from .errors import ConfigError, PipelineError

# command -> (module:function, config sections shown, config keys exposed as flags, summary)
COMMON = ["run", "models_dir", "seed", "test_mode"]
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
         "train.mask", "train.bucket_window", "train.grad_accumulation_steps", "train.keep_best",
         "train.early_stopping_patience", "train.nproc", "train.hosts", "train.distributed_backend",
         "train.steps_per_report", "train.steps_per_eval", "train.val_batches",
         "train.save_every", "train.keep_checkpoints", "train.grad_checkpoint", "train.compute_dtype"],
        "04 Train a LoRA / DoRA adapter or fully fine-tune, on the quantized (QLoRA) or full base.",
    ),
    "eval": (
        "pipeline.phases.p05_evaluate:evaluate",
        ["eval"],
        ["adapter", "quantize.enabled", "eval.max_samples", "eval.max_tokens", "eval.show_samples"],
        "05 Base vs base + adapter: test loss, perplexity, task metric, sample answers.",
    ),
    "generate": (
        "pipeline.phases.p06_generate:generate",
        ["generate"],
        ["adapter", "quantize.enabled", "generate.max_tokens", "generate.temperature"],
        "06 Chat with (or complete a prompt on) the base model plus the trained adapter.",
    ),
    "fuse": (
        "pipeline.phases.p07_fuse_lora:fuse",
        ["fuse"],
        ["adapter", "quantize.enabled", "fuse.dequantize", "fuse.dtype", "fuse.rebase", "fuse.strict"],
        "07 Fuse the adapter into the base: --no-dequantize (default) keeps it quantized, --de-quantize writes full "
        "precision.",
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
        ["adapter", "gguf.outtype", "gguf.quantizations", "gguf.keep_unquantized", "gguf.threads", "gguf.native",
         "gguf.adapter_gguf", "gguf.imatrix", "gguf.imatrix_chunks", "gguf.imatrix_chunk_tokens"],
        "09 Convert to GGUF with llama.cpp's converter, then Q8_0 / Q5_K_M / Q4_K_M with its quantizer.",
    ),
    "verify": (
        "pipeline.phases.p10_verify_gguf:verify_gguf",
        ["verify"],
        ["adapter", "verify.max_rows", "verify.max_samples", "verify.f16_max_kl", "eval.max_tokens"],
        "10 Load every GGUF in llama.cpp and measure it against the MLX fused model.",
    ),
    "install": (
        "pipeline.phases.p11_install_model:install_model",
        ["install"],
        ["install.targets", "install.lmstudio_dir", "install.publisher", "install.model_name",
         "install.max_metric_drop", "install.max_kl", "serve.port"],
        "11 Install the verified GGUF into LM Studio's models folder, write an Ollama Modelfile, print the llama.cpp "
        "commands.",
    ),
    "serve": (
        "pipeline.serve:serve",
        ["serve"],
        ["serve.host", "serve.port", "serve.n_ctx", "eval.max_tokens", "install.max_metric_drop", "install.max_kl"],
        "Serve the verified GGUF (or base + LoRA pair) with llama.cpp's OpenAI-compatible server.",
    ),
    "report": (
        "pipeline.run_report:write_report",
        ["install"],
        ["install.max_metric_drop", "install.max_kl"],
        "Write models/<run>/report.html: one self-contained page with the run's data, loss curves, metrics, "
        "GGUF sizes and quality, the file for each runtime and timings.",
    ),
    "sweep": (
        "pipeline.phases.sweep:sweep",
        ["train", "eval"],
        ["adapter", "eval.max_samples", "eval.max_tokens"],
        "Train and compare one adapter per trial of a grid (rank, alpha, lr, targets, dropout, iters) on one shared "
        "base; resumable; results table, plot, report.html and storage vs full checkpoints.",
    ),
}

S = "python scripts/"
# The first lines of each command's --help; tests/test_cli_commands.py checks every flag in them exists.
EXAMPLES = {
    "inspect": ["mlx-pipeline inspect models/demo/fused", "mlx-pipeline inspect models/demo/gguf/demo-Q8_0.gguf --json",
                "mlx-pipeline inspect models/demo/adapters/checkpoints/step-0000100 models/demo/adapters",
                "mlx-pipeline inspect models/demo/fused models/demo/fused-native"],
    "data": ["make data", "mlx-pipeline data --data my.jsonl --run myrun",
             S + "phase1-prepare-data/01_prepare_data.py --data chats/ --run myrun"],
    "base": ["make base", "mlx-pipeline base --model ibm-granite/granite-4.0-h-micro --revision main --run granite",
             S + "phase2-base-model/02_fetch_base_model.py --model ./my-hf-folder --run myrun"],
    "quantize": ["make quantize", "mlx-pipeline quantize --run myrun --bits 4 --group-size 64",
                 S + "phase2-base-model/03_quantize_base_model.py --config configs/llama-3.2-3b.yaml"],
    "train": ["make train", "TEST_MODE=1 mlx-pipeline train --run myrun --iters 50 --rank 16",
              "mlx-pipeline train --run myrun --nproc 2 --grad-accumulation-steps 4 --early-stopping-patience 3",
              S + "phase3-train/04_train_lora.py --config configs/default.yaml --resume"],
    "eval": ["make eval", "mlx-pipeline eval --run myrun --max-samples 20 --adapter last",
             S + "phase3-train/05_evaluate.py --run demo --skip-base"],
    "generate": ["mlx-pipeline generate --run demo --prompt 'Ken ordered 2 red lamps for Oslo.'",
                 S + "phase3-train/06_generate.py --run demo --no-adapter"],
    "fuse": ["make fuse DEQUANTIZE=1", "make fuse ADAPTER=last",
             "mlx-pipeline fuse --run demo --de-quantize",
             S + "phase4-fine-tune-model/07_fuse_lora.py --base-model models/demo/base-quantized \\",
             "    --adapter-path models/demo/adapters --output-dir fused-model --no-dequantize"],
    "hf": ["make hf", "mlx-pipeline hf --run demo --dtype float16",
           S + "phase5-convert-model-formats/08_convert_to_hf.py --mlx-model fused-model --output-dir hf-model"],
    "gguf": ["make gguf QUANTS=Q4_K_M,Q8_0",
             "mlx-pipeline gguf --run demo --quantization Q4_K_M,Q5_K_M,Q8_0",
             S + "phase5-convert-model-formats/09_convert_to_gguf.py --hf-model hf-model \\",
             "    --output gguf/my-model --quantization Q4_K_M"],
    "verify": ["make verify", "mlx-pipeline verify --run demo --max-samples 10",
               S + "phase6-deploy/10_verify_gguf.py --run demo"],
    "install": ["make install", "mlx-pipeline install --run demo --type Q8_0 --dry-run",
                S + "phase6-deploy/11_install_model.py --run demo --target ollama --uninstall"],
    "serve": ["mlx-pipeline serve --run demo", "mlx-pipeline serve --run demo --type Q8_0 --port 8081",
              "mlx-pipeline serve --file models/demo/gguf/demo-Q5_K_M.gguf"],
    "report": ["make report", "mlx-pipeline report --run demo",
               "mlx-pipeline report --run demo --models-dir /data/models --output /tmp/demo-report.html"],
    "sweep": ["make sweep SWEEP=configs/sweep.yaml", "mlx-pipeline sweep --run demo --sweep configs/sweep.yaml --merge",
              "mlx-pipeline sweep --config my-sweep.yaml --name lr-only --max-samples 20"],
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
    "install.targets": "--target",
}
# Spellings users already use (mlx-lm says --dequantize, our docs say --de-quantize).
FLAG_ALIASES = {"fuse.dequantize": ["--dequantize"], "gguf.native": ["--no-dequantize"]}


def _option(key: str):
    f = KEYS[key]
    meta, kind = f.metadata, type_name(f)
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


def make_command(name: str, extra_options=(), call_kwargs=lambda kw, cfg: {}):
    target, _sections, keys, summary = COMMANDS[name]

    def command(config, **kw):
        cli = {k.replace("__", "."): v for k, v in kw.items() if k.replace("__", ".") in KEYS}
        extra = {k: v for k, v in kw.items() if k.replace("__", ".") not in KEYS}
        try:
            cfg = load_config(config, cli)
            kwargs = call_kwargs(extra, cfg)
            if callable(kwargs):  # another function of the phase module (the guides' path form)
                return kwargs()
            result = _call(target, cfg, **kwargs)
            if type(result) is int:  # a long-running command (serve): its exit status
                sys.exit(result)
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
    return click.command(name, help=help_text(name, summary), short_help=summary)(command)


def help_text(name: str, summary: str) -> str:
    """Examples first (run form, then the guides' path form), then what the command does."""
    lines = "\n".join(f"  {e}" for e in EXAMPLES[name])
    return f"Examples:\n\n\b\n{lines}\n\n{summary}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mlx-pipeline")
def main():
    """Fine-tune an open LLM with MLX and ship it.

    Phases run in order; each writes models/<run>/<output>/manifest.json, which the next reads:

    \b
      base -> data -> quantize -> train -> eval / generate
      train -> fuse -> hf -> gguf -> verify

    Around them: inspect (what is in a file), sweep (many adapters on one base), report (one HTML page).
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
], lambda kw, cfg: {"resume": kw["resume"] or kw["force_resume"], "force_resume": kw["force_resume"]}))
main.add_command(make_command("eval", [
    click.option("--skip-base", is_flag=True, default=False, help="Score only base + adapter."),
], lambda kw, cfg: {"skip_base": kw["skip_base"]}))
main.add_command(make_command("generate", [
    click.option("--prompt", "-p", default=None, help="One prompt to answer; omit for an interactive chat."),
    click.option("--no-adapter", is_flag=True, default=False, help="Use the base model alone."),
    click.option("--raw", is_flag=True, default=False, help="Complete the prompt as plain text, no chat template."),
], lambda kw, cfg: {"prompt": kw["prompt"], "use_adapter": not kw["no_adapter"], "raw": kw["raw"]}))


def _given(kw: dict, names: list[str], form: str):
    """The guides' path form, when any of its flags is given: all of `names` are then required."""
    given = {n: kw[n] for n in names if kw.get(n)}
    if given and len(given) < len(names):
        missing = ", ".join("--" + n.replace("_", "-") for n in names if n not in given)
        raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in given)} also need(s) {missing}: {form}")
    return given


def _fuse_kwargs(kw, cfg):
    given = _given(kw, ["base_model", "adapter_path", "output_dir"],
                   "07_fuse_lora.py --base-model PATH|REPO --adapter-path DIR --output-dir DIR")
    if not given:
        return {}
    from .paths import GivenPaths
    from .phases.p07_fuse_lora import resolve_base

    return {"paths": GivenPaths(cfg, base=resolve_base(given["base_model"]), adapters=given["adapter_path"],
                                fused=given["output_dir"])}


def _hf_kwargs(kw, cfg):
    given = _given(kw, ["mlx_model", "output_dir"], "08_convert_to_hf.py --mlx-model DIR --output-dir DIR")
    if not given:
        return {}
    from .paths import GivenPaths

    return {"paths": GivenPaths(cfg, fused=given["mlx_model"], hf=given["output_dir"])}


def _gguf_kwargs(kw, cfg):
    given = _given(kw, ["hf_model", "output"], "09_convert_to_gguf.py --hf-model DIR --output PREFIX "
                                               "--quantization Q4_K_M[,Q5_K_M,Q8_0]")
    if not given:
        return {}
    from .phases.p09_convert_to_gguf import convert_given

    return lambda: convert_given(cfg, Path(given["hf_model"]), Path(given["output"]))


_dir = click.Path(file_okay=False)
main.add_command(make_command("fuse", [
    click.option("--base-model", default=None, help="Path form: the base model folder (or Hub repo id) the adapter "
                 "was trained on, e.g. models/<run>/base-quantized. Needs --adapter-path and --output-dir."),
    click.option("--adapter-path", default=None, type=_dir, help="Path form: the adapter folder "
                 "(adapters.safetensors + adapter_config.json), from `mlx-pipeline train` or `mlx_lm lora`."),
    click.option("--output-dir", "--save-path", "output_dir", default=None, type=_dir,
                 help="Path form: where to write the fused model (a new folder, or one an earlier fuse wrote)."),
], _fuse_kwargs))
main.add_command(make_command("hf", [
    click.option("--mlx-model", default=None, type=_dir,
                 help="Path form: an MLX model folder (07 fuse, `mlx_lm fuse`)."),
    click.option("--output-dir", "output_dir", default=None, type=_dir,
                 help="Path form: where to write the Hugging Face folder (a new folder, or one an earlier run wrote)."),
], _hf_kwargs))
main.add_command(make_command("gguf", [
    click.option("--hf-model", default=None, type=_dir, help="Path form: a Hugging Face model folder (08), or an MLX "
                 "one (07 fuse, `mlx_lm fuse`; converted to HF first)."),
    click.option("--output", default=None, help="Path form: file prefix; writes PREFIX-<TYPE>.gguf per --quantization "
                 "type and PREFIX.manifest.json."),
], _gguf_kwargs))
main.add_command(make_command("verify"))

_choice_options = [
    click.option("--type", "type_name", default=None, help="Use this verified type (Q8_0, Q4_K_M-imatrix, "
                 "F16+LoRA, ...) instead of the default choice."),
    click.option("--file", default=None, help="Use this verified GGUF file of the run (name or path)."),
    click.option("--force", is_flag=True, default=False, help="Accept a file that failed 10 verify."),
]
main.add_command(make_command("install", [
    *_choice_options,
    click.option("--dry-run", is_flag=True, default=False,
                 help="Say what would be placed and written; change nothing."),
    click.option("--uninstall", is_flag=True, default=False,
                 help="Remove what the last install of this run placed."),
    click.option("--lms", is_flag=True, default=False,
                 help="Also run `lms load` (LM Studio's CLI) when lms is on PATH."),
], lambda kw, cfg: dict(kw)))
main.add_command(make_command("serve", [
    *_choice_options,
    click.option("--lora", default=None, help="With --file: a LoRA GGUF to apply (llama.cpp --lora)."),
], lambda kw, cfg: dict(kw)))
main.add_command(make_command("report", [
    click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
                 help="Write the page here instead of models/<run>/report.html."),
], lambda kw, cfg: {"output": kw["output"]}))


def _sweep_kwargs(kw, cfg):
    config = click.get_current_context().params.get("config")  # its own `sweep:` block, without --sweep
    return {"sweep_file": kw["sweep"] or config, "own_config": not kw["sweep"], "merge": kw["merge"],
            "name": kw["name"], "keep_checkpoints": kw["keep_checkpoints"]}


main.add_command(make_command("sweep", [
    click.option("--sweep", "sweep", default=None, type=click.Path(dir_okay=False),
                 help="YAML with the `sweep:` block (grid:, runs:, fixed:, name:); default: the --config YAML's."),
    click.option("--merge", is_flag=True, default=False,
                 help="B1: score each trial as a full-precision fused model in a temporary folder, deleted "
                      "afterwards (default B2: the adapter loaded on the base, no merge)."),
    click.option("--name", default=None, help="Sweep folder name under models/<run>/sweeps/ (default: sweep.name, "
                 "else the sweep file's stem)."),
    click.option("--keep-checkpoints", is_flag=True, default=False,
                 help="Keep each finished trial's resumable checkpoints (adapter + optimizer state, ~3x the adapter); "
                      "by default only its last and best adapters stay."),
], _sweep_kwargs))


INSPECT = ("Parameters and bytes by category (embeddings, attention, MLP, Mamba/SSM, experts, norms, head, LoRA, "
           "optimizer state, metadata), storage type and bits per weight of a model folder, adapter, training "
           "checkpoint, fused model or GGUF, read from headers only. With PATH2: the differences and why.")


@main.command("inspect", help=help_text("inspect", INSPECT),
              short_help="Parameters and bytes by category of a model, adapter, checkpoint or GGUF; two compared.")
@click.argument("path", type=click.Path())
@click.argument("path2", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON (for scripts) instead of tables.")
def inspect_command(path, path2, as_json):
    import json

    from .artifact_compare import comparison_json, render_artifact, render_comparison
    from .artifact_sizes import inspect_artifact

    try:
        a = inspect_artifact(path)
        b = inspect_artifact(path2) if path2 else None
    except PipelineError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(comparison_json(a, b) if b else a.to_json(), indent=2))
    else:
        click.echo(render_comparison(a, b) if b else render_artifact(a))


def entry():
    """Console script `mlx-pipeline` (and `python -m pipeline.cli`)."""
    from .runtime import ensure_fast_blas

    ensure_fast_blas()
    main(prog_name="mlx-pipeline")


def run_script(name: str):
    """Entry point for scripts/phaseN-*/NN_*.py: the same command as `mlx-pipeline NAME`, its
    usage line showing what the user typed (`python scripts/.../07_fuse_lora.py [OPTIONS]`)."""
    from .runtime import ensure_fast_blas

    ensure_fast_blas()
    main.commands[name].main(sys.argv[1:], prog_name=f"python {sys.argv[0]}",
                             help_option_names=["-h", "--help"], max_content_width=120, terminal_width=120)


if __name__ == "__main__":
    entry()
