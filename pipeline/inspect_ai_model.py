"""Inspect AI's model provider `mlx-pipeline/<run>`: a run's base + adapter answering from MLX in this
process (pipeline/adapted_model.py), without fusing and without a server.

    inspect eval pipeline/inspect_ai_task.py --model mlx-pipeline/demo
    inspect eval pipeline/inspect_ai_task.py --model mlx-pipeline/ship -M models_dir=/tmp/runs -M adapter=last

Model args (`-M`): models_dir (default: MODELS_DIR, else "models") and adapter (best or last, default:
ADAPTER, else best), as the pipeline's own config resolves them. pipeline/inspect_ai_provider.py
registers this class with Inspect (the `inspect_ai` entry point in pyproject.toml).

MLX is not thread-safe and its default stream is per thread: the model is loaded and run on one
thread of our own, under one lock for every instance, while Inspect's event loop awaits the answers.
Concurrent samples (up to max_connections, default 16) share forward passes (continuous batching,
pipeline/adapted_model.py Batcher), as 05 answers in batches of 16.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any

import anyio
from inspect_ai.model import (
    ChatCompletionChoice,
    ChatMessage,
    ChatMessageAssistant,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
)
from inspect_ai.tool import ToolChoice, ToolInfo

from .adapted_model import AdaptedModel, Batcher, Reply, Request
from .config import load_config
from .errors import PipelineError

MODEL_ARGS = ("models_dir", "adapter")
BATCH = 16  # answers decoded together at most (05's GEN_BATCH)
_MLX_LOCK = threading.Lock()  # one MLX computation at a time in this process, whichever instance asks


class MLXPipelineAPI(ModelAPI):
    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig | None = None, **model_args: Any) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config or GenerateConfig())
        unknown = sorted(set(model_args) - set(MODEL_ARGS))
        if unknown:
            raise PipelineError(f"mlx-pipeline: unknown model arg(s) {', '.join(unknown)} (-M); "
                                f"accepted: {', '.join(MODEL_ARGS)}.")
        # CLI-like precedence: -M args > environment (MODELS_DIR, ADAPTER) > defaults.
        self.cfg = load_config(None, {"run": model_name, **{k: model_args.get(k) for k in MODEL_ARGS}})
        self._requests: queue.Queue[tuple[Request, Future] | None] = queue.Queue()
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._serve, args=(loaded,), name=f"mlx-pipeline/{model_name}",
                                        daemon=True)
        self._thread.start()
        loaded.result()  # a missing or changed run is reported here, before any sample runs

    def _serve(self, loaded: Future) -> None:
        """The MLX thread: load the model, then add arriving requests to the batch and decode it."""
        try:
            with _MLX_LOCK:
                batcher = Batcher(AdaptedModel(self.cfg), BATCH)
        except BaseException as e:
            loaded.set_exception(e)
            return
        loaded.set_result(None)
        while True:
            arrived = [self._requests.get()] if not batcher.busy else []  # idle: wait for work
            while True:
                try:
                    arrived.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            with _MLX_LOCK:
                try:
                    for item in arrived:
                        if item is None:  # close()
                            batcher.fail(PipelineError("mlx-pipeline: the model was closed."))
                            batcher.close()
                            return
                        request, future = item
                        if future.set_running_or_notify_cancel():
                            try:
                                batcher.add(request, future)
                            except Exception as e:  # this request's own problem (its chat template)
                                future.set_exception(e)
                    if batcher.busy:
                        batcher.step()
                except Exception as e:  # a decoding step failed: the requests in flight fail, the thread serves on
                    batcher.fail(e)

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo], tool_choice: ToolChoice,
                       config: GenerateConfig) -> ModelOutput:
        if tools:
            raise PipelineError("mlx-pipeline answers plain chats: it does not call tools.")
        request = Request([chat_dict(m) for m in input], max_tokens=config.max_tokens or self.cfg.generate.max_tokens,
                          temperature=config.temperature or 0.0, top_p=config.top_p,
                          stop=tuple(config.stop_seqs or ()))
        future: Future = Future()
        self._requests.put((request, future))
        reply: Reply = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)  # the loop runs on
        message = ChatMessageAssistant(content=reply.text, model=self.model_name, source="generate")
        return ModelOutput(
            model=self.model_name,
            choices=[ChatCompletionChoice(message=message,
                                          stop_reason="max_tokens" if reply.finish == "length" else "stop")],
            usage=ModelUsage(input_tokens=reply.prompt_tokens, output_tokens=reply.output_tokens,
                             total_tokens=reply.prompt_tokens + reply.output_tokens),
        )

    def max_tokens(self) -> int | None:
        return self.cfg.generate.max_tokens

    def max_connections(self) -> int:
        return BATCH

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()


def chat_dict(message: ChatMessage) -> dict:
    if message.role not in ("system", "user", "assistant"):
        raise PipelineError(f"mlx-pipeline answers plain chats: a {message.role!r} message cannot be formatted.")
    return {"role": message.role, "content": message.text}
