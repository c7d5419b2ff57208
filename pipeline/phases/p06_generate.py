"""06 Chat with (or complete a prompt on) the base model plus the trained adapter."""

from __future__ import annotations

import click

from ..errors import PipelineError
from ..manifest import read_adapter_manifest, read_manifest
from ..paths import RunPaths
from .common import start_phase


def generate(cfg, prompt: str | None = None, use_adapter: bool = True, raw: bool = False) -> str:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tuner.utils import load_adapters

    from ..modeling import load_model

    start_phase(cfg, "06 generate", ["generate"])
    paths = RunPaths(cfg)
    read_manifest(paths.train_base, "quantize" if cfg.quantize.enabled else "base")
    model, tokenizer, _ = load_model(paths.train_base, cfg.train.compute_dtype)
    if use_adapter:
        choice = paths.adapter_choice
        read_adapter_manifest(choice.source, choice.kind)
        click.echo(choice.describe())
        load_adapters(model, str(choice.folder))
    model.eval()
    sampler = make_sampler(temp=cfg.generate.temperature)

    def reply(history: list[dict] | str) -> str:
        if isinstance(history, str):
            text = history
        else:
            if tokenizer.chat_template is None:
                raise PipelineError("This tokenizer has no chat template; use --raw to complete plain text.")
            text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        out = []
        for r in stream_generate(model, tokenizer, text, max_tokens=cfg.generate.max_tokens, sampler=sampler):
            click.echo(r.text, nl=False)
            out.append(r.text)
        click.echo()
        return "".join(out)

    if prompt is not None:
        return reply(prompt if raw else [{"role": "user", "content": prompt}])

    click.echo("Interactive chat: empty line or Ctrl-D to quit, /reset to clear the history.")
    history: list[dict] = []
    answer = ""
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        if raw:
            answer = reply(line)
            continue
        history.append({"role": "user", "content": line})
        answer = reply(history)
        history.append({"role": "assistant", "content": answer})
    return answer
