"""The llama.cpp toolchain, all from one pinned llama-cpp-python release.

Its sdist carries llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/)
and its library quantizes and runs GGUF files, so converter, quantizer and runtime come from
one llama.cpp commit. `make setup` extracts the converter into a cache folder:

    python -m pipeline.llamacpp fetch [--sdist llama_cpp_python-0.3.36.tar.gz]

The importance matrix (gguf.imatrix) needs llama.cpp's command-line tools (llama-imatrix,
llama-quantize; llama-perplexity is bench/verify.py's anchor), compiled from the same sdist (a few
minutes, C++ compiler; cmake and ninja come from PyPI):

    python -m pipeline.llamacpp build-tools

Set LLAMA_CPP_DIR to use your own llama.cpp checkout instead (its `build/bin/` tools too,
when built); MLX_PIPELINE_CACHE moves the cache (default ~/.cache/mlx-pipeline).

llama.cpp stops the process (GGML_ASSERT -> abort) on some inputs, so what can abort runs in a
child first: quantizing (`python -m pipeline.llamacpp quantize SRC DST TYPE`, or llama-quantize),
the importance matrix (llama-imatrix), and before `open_gguf` loads a model (and a LoRA) here,
`python -m pipeline.llamacpp probe MODEL [--lora LORA]` loads it and evaluates one token.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import MissingInputError, PipelineError
from .fsio import atomic_path, sha256_file

VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python=={VERSION}"
# sha256 of llama_cpp_python-0.3.36.tar.gz: a downloaded sdist must be exactly this one.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the converter needs from the sdist's vendor/llama.cpp/ (plus the LoRA converter).
FILES = ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE",
         "models/templates",  # the chat templates of real models (Llama 3, Granite): tests render them
         "models/ggml-vocab-qwen2.gguf"]  # Qwen2's vocabulary: the tiny qwen2 test model's tokenizer
CONVERTER = "convert_hf_to_gguf.py"
TOOLS = ["llama-imatrix", "llama-quantize", "llama-perplexity"]  # perplexity: the anchor of bench/verify.py
SETUP_HINT = "Run `make setup` (or `python -m pipeline.llamacpp fetch`)."


def cache_root() -> Path:
    return Path(os.environ.get("MLX_PIPELINE_CACHE") or Path.home() / ".cache" / "mlx-pipeline")


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py: $LLAMA_CPP_DIR, else the pinned release's cache."""
    if os.environ.get("LLAMA_CPP_DIR"):
        return Path(os.environ["LLAMA_CPP_DIR"]).expanduser()
    return cache_root() / f"llama.cpp-{VERSION}"


def require_converter() -> Path:
    """converter_dir(), or a MissingInputError naming the command that provides it."""
    d = converter_dir()
    if not (d / CONVERTER).is_file() or not (d / "gguf-py").is_dir():
        where = "LLAMA_CPP_DIR" if os.environ.get("LLAMA_CPP_DIR") else "the cache"
        raise MissingInputError(
            f"llama.cpp's converter is missing: no {CONVERTER} and gguf-py/ in {d} ({where}). {SETUP_HINT}"
        )
    return d


def fetch_converter(sdist: str | Path | None = None, force: bool = False) -> Path:
    """Extract the converter from the pinned sdist into the cache (downloaded with pip if not given)."""
    if os.environ.get("LLAMA_CPP_DIR"):
        return require_converter()
    dest = converter_dir()
    if all((dest / f).exists() for f in FILES) and not force:
        return dest
    force = True  # an older cache lacks a newer entry of FILES: extract again
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        if sdist is None:
            sdist = _download_sdist(Path(tmp))
        # Extract to a temporary name next to the target, rename when complete.
        with atomic_path(dest) as out:
            _extract(Path(sdist), out)
    return dest


def tools_dir() -> Path:
    """Where `build-tools` puts llama.cpp's tools (TOOLS) built from the pinned sdist."""
    return cache_root() / f"llama.cpp-{VERSION}-tools"


def tool(name: str) -> Path:
    """A llama.cpp command-line tool (one of TOOLS) of the pinned commit."""
    if os.environ.get("LLAMA_CPP_DIR"):
        found = converter_dir() / "build" / "bin" / name
        if found.is_file():
            return found
        if which := shutil.which(name):
            return Path(which)
    elif (tools_dir() / name).is_file():
        return tools_dir() / name
    raise MissingInputError(
        f"llama.cpp's {name} is missing (looked in {tools_dir()}). Build it from the pinned release with "
        "`python -m pipeline.llamacpp build-tools` (needs a C++ compiler; `make setup` runs it)."
    )


def build_tools(sdist: str | Path | None = None, jobs: int | None = None, force: bool = False) -> Path:
    """Compile TOOLS from the pinned sdist's llama.cpp (CPU build)."""
    dest = tools_dir()
    if all((dest / t).is_file() for t in TOOLS) and not force:
        return dest
    cmake, ninja = _build_program("cmake"), _build_program("ninja")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        tmp = Path(tmp)
        sdist = Path(sdist) if sdist else _download_sdist(tmp)
        with tarfile.open(sdist) as tf:
            prefix = next(n[: -len(CONVERTER)] for n in tf.getnames() if n.endswith("/vendor/llama.cpp/" + CONVERTER))
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = "src/" + m.name[len(prefix):]
            tf.extractall(tmp, members=members, filter="data")
        configure = [str(cmake), "-S", str(tmp / "src"), "-B", str(tmp / "build"), "-G", "Ninja",
                     f"-DCMAKE_MAKE_PROGRAM={ninja}", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                     "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"]
        proc = subprocess.run(configure, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PipelineError(f"cmake could not configure llama.cpp:\n{_tail(proc.stdout + proc.stderr)}")
        build = [str(cmake), "--build", str(tmp / "build"), "--target", *TOOLS, "-j", str(jobs or os.cpu_count() or 2)]
        _build_with_progress(build)
        with atomic_path(dest) as out:
            out.mkdir()
            for t in TOOLS:
                shutil.copy2(tmp / "build" / "bin" / t, out / t)
            (out / "VERSION").write_text(f"{PACKAGE} ({sdist.name})\n")
    return dest


def _build_program(name: str) -> Path:
    """cmake/ninja from the virtualenv (PyPI wheels, installed by `make setup`), else from PATH."""
    here = Path(sys.executable).parent / name
    found = here if here.is_file() else shutil.which(name)
    if not found:
        raise MissingInputError(f"{name} is not installed: `pip install {name}` (make setup does).")
    return Path(found)


def _build_with_progress(cmd: list[str]) -> None:
    from tqdm import tqdm

    bar = tqdm(desc="building llama.cpp tools", unit="file", dynamic_ncols=True)
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if m := re.match(r"\[(\d+)/(\d+)\]", line):  # ninja's "[12/136] Building ..."
            bar.total = int(m[2])
            bar.n = int(m[1])
            bar.refresh()
    bar.close()
    if proc.wait() != 0:
        raise PipelineError(f"building llama.cpp's tools failed (needs a C++17 compiler):\n{_tail(''.join(tail))}")


def _download_sdist(where: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(where)]
    print(f"downloading the {PACKAGE} sdist (llama.cpp's converter)...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(where.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise PipelineError(f"`{' '.join(cmd)}` failed:\n{_tail(proc.stderr or proc.stdout)}")
    if (digest := sha256_file(found[0])) != SDIST_SHA256:
        raise PipelineError(f"{found[0].name} from the package index has sha256 {digest}, expected {SDIST_SHA256}.")
    return found[0]


def _extract(sdist: Path, out: Path) -> None:
    try:
        tf = tarfile.open(sdist)  # noqa: SIM115 (a bad file is named here; `with tf` below closes it)
    except (OSError, tarfile.TarError) as e:
        raise PipelineError(f"{sdist} is not a readable sdist ({e}).") from None
    with tf:
        prefix = None
        for name in tf.getnames():
            if name.endswith("/vendor/llama.cpp/" + CONVERTER):
                prefix = name[: -len(CONVERTER)]
        if prefix is None:
            raise PipelineError(f"{sdist} has no vendor/llama.cpp/{CONVERTER}: not a llama-cpp-python sdist.")
        wanted = tuple(prefix + f for f in FILES)
        members = []
        for m in tf.getmembers():
            if m.name in wanted or m.name.startswith(tuple(w + "/" for w in wanted)):
                m.name = m.name[len(prefix):]
                members.append(m)
        out.mkdir(parents=True)
        tf.extractall(out, members=members, filter="data")
    (out / "VERSION").write_text(f"{PACKAGE} ({sdist.name})\n")


def converter_architectures() -> set[str]:
    """HF `architectures` names the converter has a class for (TEXT_MODEL_MAP and register() calls)."""
    d = require_converter()
    names: set[str] = set()
    init = d / "conversion" / "__init__.py"
    if init.is_file():
        for node in ast.walk(ast.parse(init.read_text())):
            if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Dict):
                target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
                if getattr(target, "id", "") == "TEXT_MODEL_MAP":
                    names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    # Older checkouts register every class in the script itself.
    for f in [d / CONVERTER, *sorted((d / "conversion").glob("*.py"))]:
        if f.is_file():
            for args in re.findall(r"ModelBase\.register\(([^)]*)\)", f.read_text()):
                names |= set(re.findall(r"[\"']([\w.]+)[\"']", args))
    return names


def converter_env() -> dict:
    """Environment for the converter: its own gguf-py first (converter and gguf-py from one commit)."""
    d = require_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(d / "gguf-py"), env.get("PYTHONPATH", "")) if p)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONUNBUFFERED"] = "1"  # its log lines drive our progress bar as they come
    return env


def convert_hf_to_gguf(hf_dir: Path, outfile: Path, outtype: str, on_line=None) -> list[str]:
    """Run convert_hf_to_gguf.py with this interpreter; returns its log. `on_line` sees each line."""
    d = require_converter()
    cmd = [sys.executable, str(d / CONVERTER), str(hf_dir), "--outfile", str(outfile), "--outtype", outtype]
    log: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=converter_env(), bufsize=1)
    for line in proc.stdout:
        log.append(line.rstrip("\n"))
        if on_line:
            on_line(line)
    if proc.wait() != 0:
        raise PipelineError(
            f"llama.cpp's converter failed on {hf_dir} (exit {proc.returncode}). Its last lines:\n"
            + _tail("\n".join(log))
        )
    return list(log)


def quantize_binary() -> Path | None:
    """A user's `llama-quantize` (only with LLAMA_CPP_DIR: otherwise the pinned library is used)."""
    if not os.environ.get("LLAMA_CPP_DIR"):
        return None
    built = converter_dir() / "build" / "bin" / "llama-quantize"
    if built.is_file():
        return built
    found = shutil.which("llama-quantize")
    return Path(found) if found else None


def ftype(type_name: str) -> int:
    """llama.cpp's file type number for a type name such as Q4_K_M (LLAMA_FTYPE_MOSTLY_Q4_K_M = 15)."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if value is None:
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise PipelineError(f"llama.cpp has no quantization type '{type_name}'. Known: {', '.join(known)}.")
    return int(value)


def quantize(src: Path, dst: Path, type_name: str, threads: int = 0, name: Path | None = None) -> None:
    """Quantize a GGUF with llama.cpp's quantizer (a user's llama-quantize, else the pinned library),
    in a child process: the quantizer aborts on some inputs, and an abort must not take our process.
    `name`: the file the user knows `src` as, in messages (`src` may still be its temporary)."""
    binary = quantize_binary()
    if binary is not None:
        cmd = [str(binary), str(src), str(dst), type_name.upper()] + ([str(threads)] if threads else [])
    else:
        check_runtime()
        ftype(type_name)  # an unknown type is named here, not in the child's traceback
        cmd = [sys.executable, "-m", "pipeline.llamacpp", "quantize", str(src), str(dst), type_name,
               "--threads", str(threads)]
    run_child(cmd, f"quantizing {name or src} to {type_name}")


def _quantize_here(src: Path, dst: Path, type_name: str, threads: int) -> int:
    """The child's side of `quantize`: llama.cpp's library in this process."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(type_name)
    params.nthread = threads  # 0 = all cores
    with _log_to_stderr():
        return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params))


def n_params(path: Path) -> int:
    """Parameters of a GGUF as llama.cpp counts them (the elements of every tensor in the file), read
    by the header validator: nothing is loaded, so a file llama.cpp would abort on is counted safely
    (and gguf-py's reader, seconds on a 49k-token vocabulary, is not needed)."""
    from .untrusted import check_gguf

    return check_gguf(path)["tensor_elements"]


# --------------------------------------------------------------------------------------------
# llama.cpp in a child process
#
# llama.cpp answers some inputs with GGML_ASSERT -> abort(): in our process that is a SIGABRT we
# cannot catch, after a gdb backtrace on the terminal. Work that can abort runs in a child first,
# and its death becomes one PipelineError with llama.cpp's own assert line.

PROBE_CTX = 16  # the child only proves the file loads and evaluates: a tiny KV cache
_ASSERT = re.compile(r"GGML_ASSERT\(.*\) failed|GGML_ABORT.*")
_ABORT_LINE = re.compile(r"^\S+\.(?:c|cc|cpp|h|cu|m):\d+: (.+)$", re.MULTILINE)  # ggml_abort's "file:line: message"


def child_env() -> dict:
    """Our environment, with ggml's gdb backtrace off (GGML_NO_BACKTRACE, read by ggml_abort) and
    this package importable (`python -m pipeline.llamacpp` from a script run outside the project)."""
    here = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, GGML_NO_BACKTRACE="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)


def run_child(cmd: list[str], operation: str, timeout: float | None = None) -> str:
    """Run one llama.cpp step in a child; returns its output. A non-zero exit or a signal becomes a
    PipelineError naming the operation (a phrase that names the file) and llama.cpp's assert line."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=child_env(),
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"llama.cpp did not finish {operation} within {timeout:.0f} s.") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise child_error(operation, proc.returncode, output)
    return output


def child_error(operation: str, returncode: int, output: str) -> PipelineError:
    """The error for a llama.cpp child that failed: what it was doing, on which file, and why."""
    how = f"exit {returncode}"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            how = f"killed by {signal.Signals(-returncode).name}"
    reason = abort_reason(output)
    if reason:
        return PipelineError(
            f"llama.cpp aborted while {operation} ({how}): {reason}. The file holds something llama.cpp rejects "
            "(often a config value it does not accept, such as more experts used than exist): fix the model's "
            "config.json (or the file) and export it again."
        )
    return PipelineError(f"llama.cpp failed while {operation} ({how}). Its last lines:\n{_tail(output, 12)}")


def abort_reason(output: str) -> str | None:
    """llama.cpp's own account of an abort: the GGML_ASSERT, else ggml_abort's message."""
    if m := _ASSERT.search(output):
        return m.group(0)
    if m := _ABORT_LINE.search(output):
        return m.group(1).strip()
    for line in output.splitlines():  # an uncaught C++ exception
        if line.startswith("terminate called after throwing"):
            return line.strip()
    return None


_PROBED: set[tuple] = set()  # files (path, inode, size, mtime) this process has seen load: not probed again
_AHEAD: dict[tuple, object] = {}  # probes started by probes_ahead: key -> its Future


def _probe_key(path: Path, lora: Path | None) -> tuple:
    stats = [(str(f), os.stat(f)) for f in (path, lora) if f is not None]
    return tuple((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats)


def _probe_cmd(path: Path, lora: Path | None) -> tuple[list[str], str]:
    cmd = [sys.executable, "-m", "pipeline.llamacpp", "probe", str(path)] + (["--lora", str(lora)] if lora else [])
    return cmd, f"loading {path}" + (f" with the LoRA {lora}" if lora else "")


def probe(path: Path, lora: Path | None = None) -> None:
    """Prove in a child process that llama.cpp loads `path` (applies `lora`) and evaluates a token."""
    key = _probe_key(path, lora)
    if key in _PROBED:
        return
    ahead = _AHEAD.pop(key, None)
    if not (ahead is not None and ahead.result()):  # its PipelineError is raised here, as if it ran now
        run_child(*_probe_cmd(path, lora))
    _PROBED.add(key)


@contextlib.contextmanager
def probes_ahead(files: list[tuple[Path, Path | None]]):
    """Run the load probes of `files` ((GGUF, LoRA GGUF or None) pairs), one child at a time in the
    background, while the block does other work (10 verify: the MLX reference); `probe` later takes
    a file's result. Probes not started when the block ends are cancelled (`probe` runs them then):
    a child left running would take a core from llama.cpp's own threads."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp probe")
    started = []
    try:
        for path, lora in files:
            try:
                key = _probe_key(Path(path), Path(lora) if lora else None)
            except OSError:  # a file missing: open_gguf says so when its turn comes
                continue
            if key not in _PROBED and key not in _AHEAD:
                _AHEAD[key] = pool.submit(_probe_checked, Path(path), Path(lora) if lora else None)
                started.append(key)
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for key in started:
            if _AHEAD[key].cancelled():
                del _AHEAD[key]


def _probe_checked(path: Path, lora: Path | None) -> bool:
    """A probe ahead of time, of files whose headers pass check_gguf (False, and no child, if one
    does not: open_gguf reports that file's problem itself)."""
    from .untrusted import check_gguf

    try:
        for f in (path, lora):
            if f is not None:
                check_gguf(f)
    except PipelineError:
        return False
    run_child(*_probe_cmd(path, lora))
    return True


def _probe_here(path: Path, lora: Path | None) -> int:
    """The child's side of `probe`: load, apply the LoRA, evaluate one token."""
    import llama_cpp

    with _log_to_stderr():
        try:  # verbose=True: llama-cpp-python would otherwise point stderr at /dev/null, hiding the assert
            llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=PROBE_CTX,
                                  n_batch=PROBE_CTX, verbose=True)
        except (ValueError, RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        bos = llama_cpp.llama_vocab_bos(llm._model.vocab)
        llm.eval([max(bos, 0)])  # no BOS: any token will do
    return 0


@contextlib.contextmanager
def _log_to_stderr():
    """In a child: llama.cpp's log straight to fd 2, so that the lines before an abort survive it."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def write(level, text, user_data):
        os.write(2, text)

    llama_cpp.llama_log_set(write, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def open_gguf(path: Path, n_ctx: int, seed: int = 0, lora: Path | None = None, logits_all: bool = True):
    """llama.cpp's runtime on a GGUF (and a LoRA GGUF): headers validated, the load proved in a child
    process (an abort there is a PipelineError, not our death), then loaded here."""
    import llama_cpp

    from .untrusted import check_gguf

    for f, what in ((path, "GGUF"), (lora, "LoRA GGUF")):
        if f is not None:
            try:  # every count and offset checked before llama.cpp's reader sees the file
                check_gguf(f)
            except PipelineError as e:
                raise PipelineError(f"{f} is not a valid {what}, not loaded: {e}") from None
    check_runtime()
    probe(Path(path), Path(lora) if lora else None)
    # Should llama.cpp still abort here, the user sees its assert line, not a gdb session.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    with captured_log() as log:
        try:
            return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, logits_all=logits_all,
                                   n_ctx=n_ctx, verbose=False, seed=seed)
        except (ValueError, RuntimeError, OSError) as e:
            pair = f" with the LoRA {lora}" if lora else ""
            raise PipelineError(f"{path}{pair} does not load in llama.cpp ({e}):\n{log_tail(log, 6)}") from None


def gguf_chat_metadata(path: Path) -> dict:
    """Chat template (None if it has none), special-token texts and add_bos from a GGUF's header
    (no weights read)."""
    from gguf import GGUFReader

    from .untrusted import check_gguf  # every count and offset checked before gguf-py reads it

    check_gguf(path)
    reader = GGUFReader(str(path))

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    tokens = value("tokenizer.ggml.tokens") or []
    special = {}
    for name in ("bos", "eos", "pad", "unk"):
        idx = value(f"tokenizer.ggml.{name}_token_id")
        if idx is not None and 0 <= idx < len(tokens):
            special[f"{name}_token"] = tokens[idx]
    return {"template": value("tokenizer.chat_template"), "special_tokens": special,
            "add_bos": bool(value("tokenizer.ggml.add_bos_token"))}


def check_runtime() -> None:
    """The installed llama-cpp-python must be the pinned release the converter came from."""
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingInputError(f"llama-cpp-python is not installed ({e}). {SETUP_HINT}") from None
    if llama_cpp.__version__ != VERSION and not os.environ.get("LLAMA_CPP_DIR"):
        raise PipelineError(
            f"llama-cpp-python {llama_cpp.__version__} is installed but the pipeline pins {VERSION} "
            f"(its converter is cached for {VERSION}). Run `make setup` or `pip install {PACKAGE}`."
        )


@contextlib.contextmanager
def captured_log():
    """Collect llama.cpp's log lines instead of printing them (per-tensor chatter; on failure the
    caller shows the tail). llama-cpp-python's own callback maps the current ggml levels wrongly
    (warnings print, errors are hidden), so a plain callback is installed meanwhile."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def log_tail(lines: list[str], n: int = 12) -> str:
    return _tail("".join(lines), n)


def _tail(text: str, n: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.llamacpp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help=f"extract llama.cpp's converter from the {PACKAGE} sdist into the cache")
    f.add_argument("--sdist", help="use this sdist (.tar.gz) instead of downloading it with pip")
    f.add_argument("--force", action="store_true", help="extract again even when the cache exists")
    b = sub.add_parser("build-tools", help=f"compile {', '.join(TOOLS)} from the {PACKAGE} sdist")
    b.add_argument("--sdist", help="use this sdist (.tar.gz) instead of downloading it with pip")
    b.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    b.add_argument("--force", action="store_true", help="build again even when the tools exist")
    sub.add_parser("where", help="print the converter folder")
    q = sub.add_parser("quantize", help="quantize a GGUF with the pinned library (what phase 09 runs in a child)")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("type", help="e.g. Q4_K_M")
    q.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("probe", help="load a GGUF (and a LoRA GGUF) and evaluate one token; exit 0 if it works")
    p.add_argument("model")
    p.add_argument("--lora")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"llama.cpp converter ready: {fetch_converter(args.sdist, args.force)}")
        elif args.command == "build-tools":
            print(f"llama.cpp tools ready: {build_tools(args.sdist, args.jobs, args.force)}")
        elif args.command == "quantize":
            return 1 if _quantize_here(Path(args.src), Path(args.dst), args.type, args.threads) else 0
        elif args.command == "probe":
            return _probe_here(Path(args.model), Path(args.lora) if args.lora else None)
        else:
            print(require_converter())
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
