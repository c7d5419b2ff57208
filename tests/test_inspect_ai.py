"""Inspect AI evaluates a run without merging it: the same Inspect task (pipeline/inspect_ai_task.py,
scored with our task metric) on base + adapter straight from MLX (`--model mlx-pipeline/<run>`,
through the `inspect eval` command line as a user types it) and on the F16 base + LoRA GGUF pair
served by `mlx-pipeline serve`'s llama.cpp server (Inspect's OpenAI-compatible provider,
`openai-api/llamacpp/<name>`, through `inspect_ai.eval`) must score within 3 points.

The slow test uses `shipped_run` (tests/shipped_fixtures.py: the real SmolLM2-135M trained on the
bundled JSON task, exported, verified) and scores its valid + test rows (40): one answer is 2.5 points.
Nothing leaves this machine: proxies point nowhere except for the local server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("inspect_ai", reason="the `inspect` extra (pip install -e '.[inspect]'; make setup installs it)")

from inspect_ai import eval as inspect_eval  # noqa: E402
from inspect_ai.log import EvalLog, list_eval_logs, read_eval_log  # noqa: E402
from inspect_ai.model import get_model  # noqa: E402

from pipeline.errors import MissingInputError, PipelineError  # noqa: E402
from pipeline.metrics import score_answers  # noqa: E402

# Inspect's own retry policy uses an argument tenacity deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
SPLITS = "test,valid"
# Anything but the local server goes to a closed port: the test fails rather than reaching the network.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Our own config variables would override the fixture's run for the task and the provider.
OURS = ("RUN", "MODELS_DIR", "ADAPTER", "TEST_MODE", "CONFIG")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_log(log_dir: Path) -> EvalLog:
    logs = list_eval_logs(str(log_dir))
    assert len(logs) == 1, logs
    return read_eval_log(logs[0])


def scores(log: EvalLog) -> dict[str, float]:
    assert log.status == "success", log.error
    return {name: m.value for name, m in log.results.scores[0].metrics.items()}


def answers(log: EvalLog) -> dict[str, str]:
    return {str(s.id): s.output.completion.strip() for s in log.samples}


@pytest.mark.slow
def test_mlx_adapter_and_served_gguf_score_alike(shipped_run, tmp_path, monkeypatch):
    from pipeline.export_choice import choose_export
    from pipeline.inspect_ai_task import run_task
    from pipeline.serve import start_server

    cfg = shipped_run.cfg
    for k in OURS:
        monkeypatch.delenv(k, raising=False)
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)

    # 1. Base + adapter from MLX, in a fresh process, exactly as the README's command line.
    inspect_cli = Path(sys.executable).parent / "inspect"
    cmd = [str(inspect_cli), "eval", "pipeline/inspect_ai_task.py", "--model", f"mlx-pipeline/{cfg.run}",
           "-M", f"models_dir={cfg.models_dir}", "-T", f"run={cfg.run}", "-T", f"models_dir={cfg.models_dir}",
           "-T", f"splits={SPLITS}", "--log-dir", str(tmp_path / "mlx"), "--display", "plain"]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlx = only_log(tmp_path / "mlx")
    assert str(mlx.eval.model) == f"mlx-pipeline/{cfg.run}"

    # 2. The F16 base + LoRA GGUF pair behind llama.cpp's OpenAI-compatible server.
    choice = choose_export(cfg, type_name="F16+LORA")
    assert choice.lora is not None
    with start_server(choice.gguf, choice.lora, "127.0.0.1", free_port(), cfg.serve.n_ctx,
                      tmp_path / "server.log") as server:
        monkeypatch.setenv("LLAMACPP_BASE_URL", server.base_url)
        monkeypatch.setenv("LLAMACPP_API_KEY", "none")  # the local server checks none; Inspect wants one set
        (served,) = inspect_eval(run_task(run=cfg.run, models_dir=cfg.models_dir, splits=SPLITS),
                                 model=f"openai-api/llamacpp/{server.model}", log_dir=str(tmp_path / "served"),
                                 display="none")

    ours, theirs = scores(mlx), scores(served)
    primary = next(iter(ours))  # the headline comes first: json_match on the JSON task
    print(f"\nInspect AI on {len(mlx.samples)} rows: mlx-pipeline/{cfg.run} (MLX base + adapter) {ours}; "
          f"openai-api/llamacpp (F16 base + LoRA GGUF served) {theirs}")
    assert primary == "json_match" and len(mlx.samples) == len(served.samples) == 40
    # Inspect's number is our metric over the answers it logged (no other definition crept in).
    refs = [s.target for s in mlx.samples]
    assert score_answers([s.output.completion.strip() for s in mlx.samples], refs)[primary] == ours[primary]
    # The adapter was applied (the base alone scores 0 %), and both runtimes agree.
    assert ours[primary] >= 80, ours
    assert abs(ours[primary] - theirs[primary]) <= 3, (ours, theirs)
    same = sum(a == answers(served)[k] for k, a in answers(mlx).items())
    print(f"identical answers: {same} of {len(mlx.samples)}")
    # The provider reports token usage, as Inspect's own providers do.
    usage = mlx.stats.model_usage[f"mlx-pipeline/{cfg.run}"]
    assert usage.input_tokens > 0 and usage.output_tokens >= len(mlx.samples)


@pytest.mark.slow
def test_provider_honours_generate_config(shipped_run, monkeypatch):
    """max_tokens, stop sequences and usage through Inspect's Model API; concurrent requests all answer."""
    import anyio
    from inspect_ai.model import GenerateConfig

    from pipeline.agreement import read_rows
    from pipeline.data.formats import prompt_and_answer
    from pipeline.inspect_ai_task import chat_messages

    for k in OURS:
        monkeypatch.delenv(k, raising=False)
    cfg = shipped_run.cfg
    prompts = [chat_messages(prompt_and_answer(r)[0]) for r in read_rows(shipped_run.root / "data" / "test.jsonl", 4)]
    reference = prompt_and_answer(read_rows(shipped_run.root / "data" / "test.jsonl", 1)[0])[1]

    def json_valid(outputs) -> float:
        return score_answers([o.completion for o in outputs], [reference] * len(outputs))["json_valid"]

    async def ask():
        async with get_model(f"mlx-pipeline/{cfg.run}", models_dir=cfg.models_dir, memoize=False) as model:
            short = await model.generate(prompts[0], config=GenerateConfig(max_tokens=3))
            full = await model.generate(prompts[0], config=GenerateConfig(temperature=0, max_tokens=96))
            cut = await model.generate(prompts[0], config=GenerateConfig(max_tokens=96, stop_seqs=['"item"']))
            together = []
            async with anyio.create_task_group() as tg:  # four at once: one batch
                for p in prompts:
                    tg.start_soon(lambda p=p: _collect(model, p, together))
            return short, full, cut, together

    short, full, cut, together = anyio.run(ask)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3, short
    assert full.stop_reason == "stop" and json_valid([full]) == 100, full.completion
    assert short.usage.input_tokens == full.usage.input_tokens > 20  # the chat template's, system prompt included
    assert full.completion.startswith(short.completion)
    assert cut.stop_reason == "stop" and '"item"' not in cut.completion and full.completion.startswith(cut.completion)
    assert len(together) == 4 and json_valid(together) == 100, [o.completion for o in together]


async def _collect(model, prompt, into: list) -> None:
    into.append(await model.generate(prompt))


def test_provider_is_registered_and_names_a_missing_run(tmp_path, monkeypatch):
    """Inspect finds `mlx-pipeline` through our entry point; a run without training says what to run."""
    for k in OURS:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(MissingInputError, match=r"nope/adapters.*make train"):
        get_model("mlx-pipeline/nope", models_dir=str(tmp_path), memoize=False)
    with pytest.raises(PipelineError, match=r"unknown model arg\(s\) model_dir .*accepted: models_dir, adapter"):
        get_model("mlx-pipeline/nope", model_dir=str(tmp_path), memoize=False)
