"""`serve`: llama.cpp's OpenAI-compatible server on the shipped run's exports, asked by the real
`openai` client over HTTP, must answer the test split as well as 10 verify measured in-process.

The slow tests use `shipped_run` (tests/shipped_fixtures.py: the real SmolLM2-135M trained on the
bundled JSON task, exported to Q8_0 and to an F16 base + LoRA GGUF pair, verified). The fast ones
check the refusals: a port in use, a corrupt GGUF, and the server's flags.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.formats import prompt_and_answer
from pipeline.errors import PipelineError
from pipeline.metrics import score_answers
from pipeline.serve import (
    NO_PENALTY,
    ServerProcess,
    check_port_free,
    serve,
    server_command,
    start_server,
    training_system_prompt,
)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(server: ServerProcess, rows: list[dict], max_tokens: int, system: bool = True) -> tuple[dict, list[int]]:
    """Greedy chat answers from the server through the official openai client, scored like 10 verify
    (answers stripped, pipeline.metrics.score_answers against the rows' own answers); and the
    prompt length in tokens the server reports for each request."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
    answers, refs, prompt_tokens = [], [], []
    for row in rows:
        messages, answer = prompt_and_answer(row)
        r = client.chat.completions.create(model=server.model,
                                           messages=messages if system else without_system(messages),
                                           temperature=0, max_tokens=max_tokens, extra_body=NO_PENALTY)
        answers.append((r.choices[0].message.content or "").strip())
        refs.append(answer)
        prompt_tokens.append(r.usage.prompt_tokens)
    return score_answers(answers, refs), prompt_tokens


def without_system(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["role"] != "system"]


def template_token_counts(gguf: Path, rows: list[dict], system: bool) -> list[int]:
    """Prompt lengths when rendered with the GGUF's own chat template (as 10 verify renders it)."""
    import llama_cpp

    from pipeline.agreement import gguf_metadata
    from pipeline.untrusted import render_chat

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        meta = gguf_metadata(llm)
        prompts = [prompt_and_answer(r)[0] for r in rows]
        return [len(llm.tokenize(render_chat(meta["chat_template"], m if system else without_system(m),
                                             meta["special_tokens"], True).encode(), add_bos=False, special=True))
                for m in prompts]
    finally:
        llm.close()


def stop_and_check_gone(server: ServerProcess) -> None:
    pid = server.pid
    server.stop()
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):  # reaped: no process (not even a zombie) has its PID
        os.kill(pid, 0)


def serve_over_http(shipped_run, tmp_path, type_name: str) -> tuple[dict, dict]:
    """(score with the training system prompt, score without) of the export `type_name`."""
    from pipeline.export_choice import choose_export

    cfg = shipped_run.cfg
    choice = choose_export(cfg, type_name=type_name)
    assert (choice.lora is not None) == (type_name == "F16+LORA")
    rows = shipped_run.answered_rows()
    assert len(rows) == cfg.verify.max_samples
    server = start_server(choice.gguf, choice.lora, "127.0.0.1", free_port(), cfg.serve.n_ctx, tmp_path / "server.log")
    try:
        with_system, tokens = ask(server, rows, cfg.eval.max_tokens)
        without, tokens_without = ask(server, rows, cfg.eval.max_tokens, system=False)
    finally:
        stop_and_check_gone(server)
    # The server formatted every chat with the GGUF's own template (SmolLM2's adds its default
    # system prompt when there is none), not a built-in format.
    assert tokens == template_token_counts(choice.gguf, rows, system=True)
    assert tokens_without == template_token_counts(choice.gguf, rows, system=False)
    print(f"\n{type_name} over HTTP: {with_system['json_match']} % JSON match with the training system prompt, "
          f"{without['json_match']} % without; 10 verify: {shipped_run.metric(type_name)} %")
    return with_system, without


# ------------------------------------------------------------------------------------------------
# Over HTTP on the shipped run (slow)


@pytest.mark.slow
def test_shipped_data_always_has_the_system_prompt(shipped_run):
    from pipeline.data.sample_task import SYSTEM

    assert training_system_prompt(shipped_run.root / "data") == SYSTEM
    # ...and the test rows verify answered carry it too, so `ask` sends it as verify rendered it.
    assert all(prompt_and_answer(r)[0][0] == {"role": "system", "content": SYSTEM} for r in shipped_run.answered_rows())


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["Q8_0", "F16+LORA"])
def test_http_answers_score_as_verify(shipped_run, tmp_path, type_name):
    with_system, without = serve_over_http(shipped_run, tmp_path, type_name)
    primary = shipped_run.report["primary_metric"]
    assert primary == "json_match"
    # The fixture learned the task (90 % measured; a little slack for other CPUs' arithmetic).
    assert shipped_run.metric(type_name) >= 80, shipped_run.report["models"]
    assert abs(with_system[primary] - shipped_run.metric(type_name)) <= 3, (with_system, shipped_run.metric(type_name))
    # Trained only with its system prompt, the model loses the task without it.
    assert without[primary] <= with_system[primary] - 30, (with_system, without)


@pytest.mark.slow
def test_serve_command_prints_usage_and_stops_on_sigint(shipped_run, tmp_path):
    """`mlx-pipeline serve` in the foreground, as a user runs it: it prints why it chose the file,
    the URL and the examples; the URL answers; Ctrl-C (SIGINT) stops the server and exits 0."""
    cfg = shipped_run.cfg
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RUN", "MODELS_DIR", "TEST_MODE")}
    cmd = [str(Path(sys.executable).parent / "mlx-pipeline"), "serve", "--models-dir", cfg.models_dir,
           "--run", cfg.run, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, server_pid = [], None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            out.append(line)
            if "(PID " in line:
                server_pid = int(line.split("(PID ")[1].split(")")[0])
            if line.startswith("Ctrl-C stops"):
                break
        text = "".join(out)
        assert server_pid is not None, text
        assert f"http://127.0.0.1:{port}/v1" in text and "why:" in text and "curl -s" in text, text
        from pipeline.data.sample_task import SYSTEM

        assert SYSTEM in text and "from openai import OpenAI" in text, text
        from openai import OpenAI

        models = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0).models.list()
        assert len(models.data) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)


@pytest.mark.slow
def test_a_server_that_dies_while_loading_is_reported_not_fatal(shipped_run, tmp_path):
    """A GGUF llama.cpp will not load as a model (here the LoRA GGUF, which passes the header check):
    the child exits, we raise PipelineError with its log tail and carry on."""
    lora = shipped_run.root / "gguf" / f"{shipped_run.cfg.run}-adapter-LoRA-F16.gguf"
    with pytest.raises(PipelineError, match=r"exited with code .* while starting.*\n.*") as e:
        start_server(lora, None, "127.0.0.1", free_port(), 512, tmp_path / "server.log")
    print(f"\nserver load failure as reported:\n{e.value}")


# ------------------------------------------------------------------------------------------------
# Refusals (fast)


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PipelineError, match=rf"Port {port} .* already in use.*--port"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(PipelineError, match="--port"):  # refused before any process starts
            start_server(tmp_path / "never-read.gguf", None, "127.0.0.1", port, 256, tmp_path / "log")
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF" + struct.pack("<IQQ", 3, 10**9, 10**9),
                                     b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40)])
def test_corrupt_gguf_is_refused_before_the_server_starts(tmp_path, monkeypatch, content):
    import pipeline.serve as serve_module

    started = []
    monkeypatch.setattr(serve_module, "start_server", lambda *a, **k: started.append(a))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    cfg = load_config(None, {"models_dir": str(tmp_path / "models"), "run": "r"}, env={})
    with pytest.raises(PipelineError, match="Refused to serve bad.gguf"):
        serve(cfg, file=str(bad))
    assert started == []


def test_lora_needs_its_base_file(tmp_path):
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "r"}, env={})
    with pytest.raises(PipelineError, match="--lora needs --file"):
        serve(cfg, lora="x-LoRA.gguf")


def test_server_command_uses_real_server_flags_and_the_gguf_template():
    from llama_cpp.server.settings import Settings

    cmd = server_command(Path("m.gguf"), Path("a.gguf"), "127.0.0.1", 8081, 4096)
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    flags = [c[2:] for c in cmd if c.startswith("--")]
    assert set(flags) <= set(Settings.model_fields), set(flags) - set(Settings.model_fields)
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args["--chat_format"] == "chat_template.default" and args["--lora_path"] == "a.gguf"
    assert args["--host"] == "127.0.0.1" and args["--port"] == "8081" and args["--n_ctx"] == "4096"
    assert "--lora_path" not in server_command(Path("m.gguf"), None, "127.0.0.1", 8081, 4096)


@pytest.mark.parametrize("rows, expected", [
    ([[("system", "S"), ("user", "a"), ("assistant", "b")], [("system", "S"), ("user", "c"), ("assistant", "d")]], "S"),
    ([[("system", "S"), ("user", "a"), ("assistant", "b")],
      [("system", "T"), ("user", "c"), ("assistant", "d")]], None),
    ([[("system", "S"), ("user", "a"), ("assistant", "b")], [("user", "c"), ("assistant", "d")]], None),
    ([], None),
])
def test_training_system_prompt(tmp_path, rows, expected):
    lines = [json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}) for row in rows]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert training_system_prompt(tmp_path) == expected


def test_training_system_prompt_of_completions_or_no_data(tmp_path):
    assert training_system_prompt(tmp_path) is None
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert training_system_prompt(tmp_path) is None
