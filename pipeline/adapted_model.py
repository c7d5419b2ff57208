"""A run's base model plus its trained adapter, straight from MLX (no fuse, no server), answering chats
as they come (continuous batching): what the Inspect AI provider (pipeline/inspect_ai_model.py) serves.

It loads what 05 evaluate and 06 generate load: the training base (models/<run>/base-quantized for
QLoRA) in the compute dtype the adapter was trained in, then the adapter 05-10 pick (config
`adapter`: best or last, paths.AdapterChoice), each checked against the manifest that wrote it.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from .errors import PipelineError
from .manifest import read_adapter_manifest, read_manifest
from .paths import AdapterChoice, RunPaths


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish: str  # "stop" (end of turn or a stop sequence) or "length" (max_tokens reached)


class AdaptedModel:
    """Not thread-safe (MLX is not): load and use it on one thread."""

    def __init__(self, cfg):
        from .agreement import load_trained

        paths = RunPaths(cfg)
        self.choice: AdapterChoice = paths.adapter_choice
        trained = (read_adapter_manifest(self.choice.source, self.choice.kind).get("config") or {})
        # The base and dtype the adapter was trained on, whatever the config says today.
        quantized = (trained.get("quantize") or {}).get("enabled", cfg.quantize.enabled)
        dtype = (trained.get("train") or {}).get("compute_dtype", cfg.train.compute_dtype)
        self.base = paths.quantized if quantized else paths.base
        read_manifest(self.base, "quantize" if quantized else "base")
        self.model, self.tokenizer = load_trained(self.base, self.choice.folder, dtype)
        if self.tokenizer.chat_template is None:
            raise PipelineError(f"{self.base} has no chat template: its tokenizer cannot format chat prompts.")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """`messages` ({"role", "content"} dicts) through the model's chat template, ready for the answer."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy, as 05 answers
    top_p: float | None = None
    stop: tuple[str, ...] = ()


class Batcher:
    """Continuous batching on one AdaptedModel (mlx-lm's BatchGenerator, as 05 answers in batches): a
    request joins the running batch when it arrives and leaves it when its answer is complete, so
    concurrent callers share each forward pass. One thread drives it: `add`, then `step` while `busy`;
    each request's Future gets its Reply (or, after `fail`, the error)."""

    def __init__(self, adapted: AdaptedModel, max_batch: int = 16):
        from mlx_lm.generate import BatchGenerator

        self.adapted = adapted
        self._new = lambda: BatchGenerator(adapted.model, stop_tokens=[[t] for t in adapted.tokenizer.eos_token_ids],
                                           completion_batch_size=max_batch)
        self.gen = self._new()
        self.active: dict[int, tuple[Request, int, list[int], Future]] = {}

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def add(self, request: Request, done: Future) -> None:
        """Queue `request`; `step` sets `done`'s result once its answer is complete."""
        from mlx_lm.sample_utils import make_sampler

        ids = self.adapted.prompt_ids(request.messages)
        sampler = None  # greedy
        if request.temperature > 0:
            sampler = make_sampler(temp=request.temperature, top_p=request.top_p or 0.0)
        (uid,) = self.gen.insert([ids], [request.max_tokens], samplers=[sampler])
        self.active[uid] = (request, len(ids), [], done)

    def step(self) -> None:
        """One decoding step of every active request (prefilling the new ones first)."""
        for r in self.gen.next_generated():
            request, n_prompt, tokens, done = self.active[r.uid]
            if r.finish_reason != "stop":  # "stop" comes with the end-of-turn token, not part of the answer
                tokens.append(r.token)
            if r.finish_reason is not None:
                del self.active[r.uid]
                done.set_result(self._reply(request, n_prompt, tokens, r.finish_reason))

    def fail(self, error: BaseException) -> None:
        """Give every active request `error` and start over with an empty batch."""
        for *_, done in self.active.values():
            done.set_exception(error)
        self.active.clear()
        self.gen = self._new()

    def _reply(self, request: Request, n_prompt: int, tokens: list[int], finish: str) -> Reply:
        text = self.adapted.tokenizer.decode(tokens)
        cut = min((i for i in (text.find(s) for s in request.stop if s) if i >= 0), default=-1)
        if cut >= 0:  # stop sequences are applied to the finished answer
            text, finish = text[:cut], "stop"
        return Reply(text, n_prompt, len(tokens), "stop" if finish == "stop" else "length")

    def close(self) -> None:
        self.gen.close()
