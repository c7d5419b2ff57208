"""`mlx-pipeline serve`: llama.cpp's OpenAI-compatible server on the export a user should load.

    mlx-pipeline serve --run demo                      # the file 10 verify's measurements pick
    mlx-pipeline serve --run demo --type Q8_0 --port 8081
    mlx-pipeline serve --file models/demo/gguf/demo-Q5_K_M.gguf

The server is llama-cpp-python's (`python -m llama_cpp.server`, the `[server]` extra), run as a
child process in its own process group: a llama.cpp abort ends the child, not us, and Ctrl-C /
SIGTERM reach us first, then are forwarded to it. It is bound to serve.host (127.0.0.1: this
machine only) and formats chats with the GGUF's own Jinja chat template, the one 10 verify checked
against the trained model's. Its log goes to a file; only our summary is printed.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click

from . import llamacpp
from .errors import MissingInputError, PipelineError
from .export_choice import choose_export
from .paths import RunPaths
from .untrusted import check_gguf

SERVER_PACKAGE = "llama-cpp-python[server]==0.3.36"
# Modules `python -m llama_cpp.server` imports beyond llama_cpp itself (the [server] extra).
SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
# llama-cpp-python names the GGUF's own template "chat_template.default"; without it named, a
# template byte-equal to its built-in ChatML/Llama-3/Mistral strings is swapped for a built-in
# formatter, and a GGUF with no template silently gets "llama-2".
GGUF_TEMPLATE = "chat_template.default"
# llama.cpp's server applies a repeat penalty of 1.1 unless a request says otherwise, also at
# temperature 0, so greedy answers can differ from 10 verify's (measured on the shipped test run:
# none of 20 trained-task answers changed, 6 of 20 free-text ones did). Clients send 1.0.
NO_PENALTY = {"repeat_penalty": 1.0}
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0


@dataclass
class ServerProcess:
    """A running llama.cpp server; `stop()` ends it by its PID (its process group)."""

    process: subprocess.Popen
    host: str
    port: int
    log_path: Path
    model: str  # the name it answers to in /v1/models

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/v1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (uvicorn shuts down cleanly), SIGKILL after `timeout` seconds; the exit code."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log_tail(self, n: int = 15) -> str:
        return log_tail(self.log_path, n)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# The command line and the child process


def server_command(gguf: Path, lora: Path | None, host: str, port: int, n_ctx: int,
                   model_alias: str | None = None) -> list[str]:
    """`python -m llama_cpp.server` serving `gguf` (+ the LoRA GGUF `lora`) with its own chat template."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
           "--n_ctx", str(n_ctx), "--chat_format", GGUF_TEMPLATE, "--verbose", "true",  # into the log file
           "--model_alias", model_alias or model_name(gguf, lora)]
    if lora is not None:
        cmd += ["--lora_path", str(lora)]
    return cmd


def model_name(gguf: Path, lora: Path | None = None) -> str:
    return Path(gguf).stem + (f"+{Path(lora).stem}" if lora else "")


def check_server_installed() -> None:
    import importlib.util

    missing = [m for m in ("llama_cpp", *SERVER_MODULES) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingInputError(
            f"llama-cpp-python's server is not installed (missing: {', '.join(missing)}). "
            f"Run `pip install '{SERVER_PACKAGE}'` (no rebuild when its wheel is cached), or `make setup`.")


def start_server(gguf: Path, lora: Path | None = None, host: str = "127.0.0.1", port: int = 8080,
                 n_ctx: int = 4096, log_path: Path | None = None, timeout: float = START_TIMEOUT_S) -> ServerProcess:
    """Start the server and return once GET /v1/models answers. A port in use, a server that dies
    while loading, or one that never answers raises PipelineError with the tail of its log."""
    check_server_installed()
    check_port_free(host, port)
    if log_path is None:
        log_path = Path(tempfile.gettempdir()) / f"mlx-pipeline-serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(gguf, lora, host, port, n_ctx)
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        # Own session and process group: llama.cpp aborts stay in the child, the terminal's Ctrl-C
        # reaches only us (serve() forwards it), and stop() can signal the whole group.
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=server_env(host, port), start_new_session=True)
    server = ServerProcess(process, host, port, log_path, model_name(gguf, lora))
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def server_env(host: str, port: int) -> dict:
    """Our environment without the variables llama_cpp.server would read as settings: pydantic
    reads every field name (MODEL, N_CTX, LORA_PATH, ... in any case), CONFIG_FILE replaces all
    arguments, and its __main__ hands HOST/PORT to uvicorn over --host/--port: those two are ours."""
    from llama_cpp.server.settings import Settings

    names = {n.lower() for n in Settings.model_fields} | {"config_file"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in names}
    env.update(HOST=host, PORT=str(port), GGML_NO_BACKTRACE="1")  # an abort's log tail: its assert, not gdb
    return env


def check_port_free(host: str, port: int) -> None:
    """Bind the port ourselves first: the server would load the model, then fail to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise _port_in_use(host, port) from None
            raise PipelineError(f"Cannot bind {host}:{port} ({e.strerror}). Check serve.host (--host) "
                                "and serve.port (--port).") from None


def _port_in_use(host: str, port: int) -> PipelineError:
    return PipelineError(f"Port {port} on {host} is already in use (another server?). Choose another one with "
                         f"--port (or serve.port in the YAML), e.g. --port {port + 1}, or stop what listens there.")


def _wait_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{_url_host(server.host)}:{server.port}/v1/models"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    while time.monotonic() < deadline:
        if not server.alive():
            tail = server.log_tail()
            if "address already in use" in tail.lower():  # taken between our check and its bind
                raise _port_in_use(server.host, server.port)
            raise PipelineError(f"The llama.cpp server exited with code {server.process.returncode} while "
                                f"starting. From its log {server.log_path}:\n{tail}")
        if server.model in _served_models(opener, url):
            return
        time.sleep(0.25)
    raise PipelineError(f"The llama.cpp server did not answer {url} within {timeout:.0f} s. "
                        f"From its log {server.log_path}:\n{server.log_tail()}")


def _served_models(opener, url: str) -> list[str]:
    """Model ids GET /v1/models lists; [] while nothing (or something else) answers there."""
    try:
        with opener.open(url, timeout=2) as r:
            return [m.get("id") for m in json.loads(r.read()).get("data", [])]
    except (OSError, ValueError, AttributeError):  # URLError, refused, reset, timeout, not JSON
        return []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # its own group: start_new_session made it the leader, pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):  # all interfaces: this machine reaches it as localhost
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def log_tail(path: Path, n: int = 15) -> str:
    """What explains a failure: llama.cpp's error lines (its load errors come before Python's
    traceback) and the last line, or else the last `n` lines."""
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "    (no log)"
    errors = [line for line in lines[:-1] if any(w in line.lower() for w in ("error", "failed", "abort"))]
    picked = errors[-6:] + lines[-1:] if errors else lines[-n:]
    return "\n".join("    " + line for line in picked)


# ------------------------------------------------------------------------------------------------
# What the run's data says about prompting


def training_system_prompt(data_dir: Path) -> str | None:
    """The system message every training chat started with, or None (no train.jsonl, completions
    or text rows, a chat without one, or differing ones). A model trained only with that system
    prompt should be sent it: without it the sample task's JSON answers fall apart."""
    path = Path(data_dir) / "train.jsonl"
    if not path.is_file():
        return None
    prompt = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                messages = json.loads(line).get("messages")
                first = messages[0]
            except (ValueError, AttributeError, TypeError, IndexError, KeyError):
                return None
            if (not isinstance(first, dict) or first.get("role") != "system"
                    or not isinstance(first.get("content"), str)):
                return None
            if prompt is not None and first["content"] != prompt:
                return None
            prompt = first["content"]
    return prompt


def _example_user_message(data_dir: Path) -> str:
    """The first test chat's last user message (an input the model was trained for)."""
    path = Path(data_dir) / "test.jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            messages = json.loads(f.readline()).get("messages") or []
        return next(m["content"] for m in reversed(messages) if m.get("role") == "user")
    except (OSError, ValueError, AttributeError, TypeError, KeyError, StopIteration):
        return "Hello!"


# ------------------------------------------------------------------------------------------------
# The command


def serve(cfg, type_name: str | None = None, file: str | None = None, lora: str | None = None,
          force: bool = False) -> int:
    """Serve the chosen export in the foreground until Ctrl-C / SIGTERM (forwarded to the server),
    then return 0. A server that dies on its own raises PipelineError with its log tail."""
    gguf, lora_path, reason = _choose(cfg, type_name, file, lora, force)
    for f in [gguf] + ([lora_path] if lora_path else []):
        try:  # every count and offset checked before llama.cpp's reader sees the file
            check_gguf(f)
        except PipelineError as e:
            raise PipelineError(f"Refused to serve {f.name}: {e}") from None
    if not llamacpp.gguf_chat_metadata(gguf)["template"]:
        raise PipelineError(f"{gguf} has no chat template (tokenizer.chat_template) in its metadata: the server would "
                            "format chats with a generic built-in one, not the model's. Re-export it with `make gguf`.")
    run = _run_root(gguf)
    click.secho(f"== serve (run '{cfg.run}') ==", bold=True)
    click.echo(f"model: {gguf}" + (f"\nLoRA:  {lora_path}" if lora_path else ""))
    click.echo(f"why:   {reason}")
    if not _is_loopback(cfg.serve.host):
        click.secho(f"warning: serve.host {cfg.serve.host} lets other machines reach the server (it has no API key).",
                    fg="yellow")
    log = run / "serve" / f"server-{cfg.serve.port}.log" if run else None
    previous = _on_stop_signals(_stop_requested)
    server = None
    try:
        server = start_server(gguf, lora_path, cfg.serve.host, cfg.serve.port, cfg.serve.n_ctx, log)
        system = training_system_prompt(run / "data") if run else None
        user = _example_user_message(run / "data") if run else "Hello!"
        click.echo(usage(server, system, user, cfg.eval.max_tokens))
        while server.alive():
            time.sleep(0.2)
        raise PipelineError(f"The llama.cpp server exited by itself with code {server.process.returncode}. "
                            f"From its log {server.log_path}:\n{server.log_tail()}")
    except _StopRequested as stop:
        if server is None:  # start_server stopped its child before re-raising
            click.echo(f"\n{stop.name}: stopped before the server was ready.")
        else:
            code = server.stop()
            # uvicorn shuts down, then re-raises the SIGTERM it caught: -15 is a clean stop.
            how = "cleanly" if code in (0, -signal.SIGTERM) else f"with exit code {code}"
            click.echo(f"\n{stop.name}: the server (PID {server.pid}) stopped {how}.")
        return 0
    finally:
        if server is not None:
            server.stop()
        _on_stop_signals(previous)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class _StopRequested(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.name = signal.Signals(signum).name


def _stop_requested(signum, _frame):
    # Later signals are ignored, so that they cannot interrupt the server's shutdown.
    _on_stop_signals(signal.SIG_IGN)
    raise _StopRequested(signum)


def _on_stop_signals(handler) -> dict:
    """Install `handler` (one, or a dict per signal) for SIGINT and SIGTERM; the previous ones."""
    handlers = handler if isinstance(handler, dict) else dict.fromkeys((signal.SIGINT, signal.SIGTERM), handler)
    return {s: signal.signal(s, h) for s, h in handlers.items()}


def _run_root(gguf: Path) -> Path | None:
    """models/<run>/ of a file in models/<run>/gguf/ (its data/ says how it was trained), else None."""
    root = Path(gguf).resolve().parent.parent
    return root if Path(gguf).resolve().parent.name == "gguf" and (root / "data").is_dir() else None


def _choose(cfg, type_name, file, lora, force) -> tuple[Path, Path | None, str]:
    """(GGUF, LoRA GGUF or None, why): an explicit file, or 10 verify's choice (choose_export)."""
    if lora and not file:
        raise PipelineError("--lora needs --file: the base GGUF the LoRA GGUF applies to.")
    if file:
        path = _existing(file, RunPaths(cfg).gguf)
        lora_path = _existing(lora, RunPaths(cfg).gguf) if lora else None
        if path.parent.resolve() == RunPaths(cfg).gguf.resolve() and (RunPaths(cfg).verify / "report.json").is_file():
            choice = choose_export(cfg, file=path.name, force=force)
            if lora_path is None or lora_path.resolve() == (choice.lora and choice.lora.resolve()):
                return choice.gguf, choice.lora, choice.reason
        return path, lora_path, f"--file {file}" + (f" --lora {lora}" if lora else "") + " (not measured by 10 verify)"
    choice = choose_export(cfg, type_name=type_name, force=force)
    return choice.gguf, choice.lora, choice.reason


def _existing(name: str, gguf_dir: Path) -> Path:
    for p in (Path(name), gguf_dir / name):
        if p.is_file():
            return p
    raise MissingInputError(f"{name}: no such file (also looked in {gguf_dir}).")


def usage(server: ServerProcess, system: str | None, user: str, max_tokens: int) -> str:
    """Where the server is, and a curl and an openai example with the training system prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    body = {"model": server.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **NO_PENALTY}
    curl = (f"curl -s {server.base_url}/chat/completions -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(json.dumps(body))}")
    py = "\n".join([
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{server.base_url}", api_key="none")',
        f"r = client.chat.completions.create(model={server.model!r}, temperature=0, max_tokens={max_tokens},",
        f"    extra_body={NO_PENALTY!r},  # the server's default 1.1 can change greedy answers",
        f"    messages={messages!r})",
        "print(r.choices[0].message.content)",
    ])
    note = (f"The model was trained with this system prompt on every chat; send it:\n  {system}\n" if system
            else "")
    return (f"\nOpenAI-compatible server (PID {server.pid}) at {server.base_url}\nlog: {server.log_path}\n\n{note}"
            f"\ncurl:\n{curl}\n\nPython (pip install openai):\n{py}\n\nCtrl-C stops the server.")
