"""An Inspect AI task on a run's own held-out chats, scored with the pipeline's task metric
(pipeline/metrics.py: JSON match for JSON answers such as the bundled json-extract task, else exact
match), so its score is the number 05 evaluate and 10 verify report.

    inspect eval pipeline/inspect_ai_task.py --model mlx-pipeline/demo              # base + adapter, MLX
    inspect eval pipeline/inspect_ai_task.py -T splits=test,valid --model openai-api/llamacpp/<name>

Task args (`-T`): run and models_dir (default: RUN / MODELS_DIR, else demo / models, as the
pipeline's config resolves them), config (a YAML such as configs/default.yaml), splits (comma-separated
data/ splits, default test). Answers are greedy with 05's eval.max_tokens.
"""

from __future__ import annotations

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser, GenerateConfig
from inspect_ai.scorer import CORRECT, INCORRECT, SampleScore, Score, Target, metric, scorer
from inspect_ai.solver import TaskState, generate

from pipeline.agreement import read_rows
from pipeline.config import load_config
from pipeline.data.formats import prompt_and_answer
from pipeline.metrics import score_answers
from pipeline.paths import RunPaths
from pipeline.serve import NO_PENALTY  # llama.cpp's server would apply a repeat penalty; others ignore extra_body

_MESSAGE = {"system": ChatMessageSystem, "user": ChatMessageUser, "assistant": ChatMessageAssistant}


@task
def run_task(run: str | None = None, models_dir: str | None = None, config: str | None = None,
             splits: str | list[str] = "test") -> Task:
    cfg = load_config(config, {"run": run, "models_dir": models_dir})
    samples = []
    names = splits.split(",") if isinstance(splits, str) else splits  # `-T splits=test,valid` arrives as a list
    for split in [s.strip() for s in names if s.strip()]:
        for i, row in enumerate(read_rows(RunPaths(cfg).data / f"{split}.jsonl")):
            messages, answer = prompt_and_answer(row)
            samples.append(Sample(input=chat_messages(messages), target=answer, id=f"{split}-{i + 1}"))
    return Task(dataset=MemoryDataset(samples, name=f"{cfg.run}:{'+'.join(names)}"), solver=generate(),
                scorer=task_metric(),
                config=GenerateConfig(temperature=0.0, max_tokens=cfg.eval.max_tokens, extra_body=NO_PENALTY))


def chat_messages(messages: list[dict]) -> list:
    """Our {"role", "content"} chat dicts as Inspect's message objects."""
    return [_MESSAGE[m["role"]](content=m["content"]) for m in messages]


@metric
def pipeline_metric():
    """score_answers over all answers at once: percentages (0-100), headline (json_match or exact_match) first."""

    def compute(scores: list[SampleScore]) -> dict:
        out = score_answers([s.score.answer or "" for s in scores], [s.score.metadata["reference"] for s in scores])
        keys = [out["primary"]] + [k for k in ("json_match", "json_valid", "exact_match") if k != out["primary"]]
        return {k: out[k] for k in keys if k in out}

    return compute


@scorer(metrics=[pipeline_metric()])
def task_metric():
    async def score(state: TaskState, target: Target) -> Score:
        answer = state.output.completion.strip()  # as 05 and 10 strip generated answers
        one = score_answers([answer], [target.text])
        return Score(value=CORRECT if one[one["primary"]] == 100 else INCORRECT, answer=answer,
                     metadata={"reference": target.text})

    return score
