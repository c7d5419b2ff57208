"""Hostile and broken inputs are refused with a clear error: no crash, no hang, nothing executed.

The corpus goes through the real entry points: `check_safetensors` and `modeling.check_weight_files`
(before MLX), `check_gguf` and phase 02's GGUF import (before gguf-py / transformers), phase 01's
data loading, and the sandboxed chat-template renderer. Positive controls show the validators
accept files written by the reference writers (safetensors, MLX, gguf-py, the embedded SmolLM2
GGUF) and agree with the reference readers on a few corrupted files. Every test runs under an
alarm, so a hang fails it instead of blocking the suite; the slowest case is printed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import DataError, MissingInputError, PipelineError, UntrustedFileError
from pipeline.untrusted import check_gguf, check_safetensors, render_chat

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 10
TIMES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _no_hang(request):
    """Fail a case that runs past HANG_S seconds (instead of hanging the suite); record its time."""
    def on_alarm(*_):
        raise TimeoutError(f"{request.node.name} ran past {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_S)
    start = time.perf_counter()
    yield
    TIMES[request.node.name] = time.perf_counter() - start
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def _report_slowest():
    yield
    slowest = sorted(TIMES.items(), key=lambda kv: -kv[1])[:5]
    print("\nslowest hostile-input cases: " + ", ".join(f"{n} {t:.3f} s" for n, t in slowest))


@pytest.fixture(scope="module")
def smol():
    """The embedded SmolLM2 GGUF and gguf-py's reader of it (4 s: read once, outside the alarm)."""
    from gguf import GGUFReader

    from pipeline.embedded import embedded_gguf

    return embedded_gguf(), GGUFReader(str(embedded_gguf()))


# ---------------------------------------------------------------- safetensors

def st(tensors: dict | None = None, data: bytes | None = None, header: bytes | None = None,
       n: int | None = None) -> bytes:
    """A safetensors file: 8-byte length, JSON header, data (zeros up to the last offset by default)."""
    tensors = {"w": T("F32", [2, 2], 0, 16)} if tensors is None else tensors
    raw = json.dumps(tensors).encode() if header is None else header
    if data is None:
        data = bytes(max([v["data_offsets"][1] for k, v in tensors.items() if k != "__metadata__"] or [0]))
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def T(dtype, shape, begin, end) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# (id, file bytes, message fragment, the reference library refuses it too)
SAFETENSORS_CASES = [
    ("empty-file", lambda: b"", "shorter than the 8-byte header length", True),
    ("header-over-100MB", lambda: st(n=200_000_000), "exceeds the 100000000-byte limit", True),
    ("header-past-eof", lambda: st(n=10_000), "runs past the end of the file", True),
    ("header-not-utf8", lambda: st(header=b'{"w\xff": 1}'), "not UTF-8", True),
    ("header-not-object", lambda: st(header=b"[1, 2]", data=b""), "does not start with '{'", True),
    ("header-bad-json", lambda: st(header=b'{"w": {"dtype": ', data=b""), "not valid JSON", True),
    ("header-nested-200k", lambda: st(header=b'{"a":' + b"[" * 200_000, data=b""), "not valid JSON", True),
    ("unknown-dtype", lambda: st({"w": T("F33", [4], 0, 16)}), "unknown dtype 'F33'", True),
    ("negative-dim", lambda: st({"w": T("F32", [-4], 0, 16)}), "not a list of non-negative integers", True),
    ("bool-dim", lambda: st({"w": T("U8", [True], 0, 1)}), "not a list of non-negative integers", True),
    ("offsets-arity", lambda: st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16]}}, data=bytes(16)),
     "not [begin, end]", True),
    ("end-before-begin", lambda: st({"w": T("F32", [0], 16, 0)}, data=bytes(16)),
     "ends (byte 0) before it begins", True),
    ("size-mismatch", lambda: st({"w": T("F32", [3, 3], 0, 16)}), "is 36 bytes but data_offsets span 16", True),
    ("shape-overflow", lambda: st({"w": T("F32", [2**40, 2**40], 0, 16)}), "overflows 64 bits", True),
    ("overlap", lambda: st({"a": T("F32", [4], 0, 16), "b": T("F32", [4], 8, 24)}),
     "overlaps the previous tensor", True),
    ("gap", lambda: st({"a": T("F32", [4], 0, 16), "b": T("F32", [4], 32, 48)}), "leaves a gap", True),
    ("truncated-data", lambda: st(data=bytes(10)), "tensors cover 16 bytes but the data buffer is 10", True),
    ("trailing-bytes", lambda: st(data=bytes(40)), "the data buffer is 40 bytes", True),
    ("duplicate-name", lambda: st(header=b'{"w": ' + json.dumps(T("F32", [4], 0, 16)).encode()
                                  + b', "w": ' + json.dumps(T("F32", [4], 16, 32)).encode() + b"}", data=bytes(32)),
     "repeats the key 'w'", False),
    ("metadata-not-str", lambda: st({"__metadata__": {"format": 1}, "w": T("F32", [4], 0, 16)}),
     "__metadata__ must map strings to strings", True),
    ("tensor-not-object", lambda: st({"w": [0, 16]}, data=bytes(16)), "tensor 'w' is not an object", True),
]


@pytest.mark.parametrize("make,fragment,reference", [c[1:] for c in SAFETENSORS_CASES],
                         ids=[c[0] for c in SAFETENSORS_CASES])
def test_hostile_safetensors_refused(tmp_path, make, fragment, reference):
    from safetensors import SafetensorError, safe_open

    f = tmp_path / "model.safetensors"
    f.write_bytes(make())
    with pytest.raises(UntrustedFileError, match="re-download or re-export") as e:
        check_safetensors(f)
    assert str(f) in str(e.value) and fragment in str(e.value), str(e.value)
    if reference:  # the reference library refuses the same file
        with pytest.raises(SafetensorError):
            with safe_open(str(f), framework="numpy"):
                pass


@pytest.mark.parametrize("case", ["header-past-eof", "overlap", "truncated-data"])
def test_check_weight_files_refuses_before_mlx(tmp_path, case):
    from pipeline.modeling import check_weight_files

    make, fragment = next((c[1], c[2]) for c in SAFETENSORS_CASES if c[0] == case)
    (tmp_path / "model-00001.safetensors").write_bytes(st())
    (tmp_path / "model-00002.safetensors").write_bytes(make())
    with pytest.raises(UntrustedFileError, match=fragment) as e:
        check_weight_files(tmp_path)
    assert "model-00002.safetensors" in str(e.value)


def test_valid_safetensors_pass(tmp_path):
    import mlx.core as mx
    from safetensors.numpy import save_file

    from pipeline.modeling import check_weight_files

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int8),
              "empty": np.zeros((0, 3), np.float16), "c": np.zeros((2, 3, 4), np.int64)}
    save_file(arrays, str(tmp_path / "np.safetensors"), metadata={"format": "np"})
    mx.save_safetensors(str(tmp_path / "mx.safetensors"), {"w": mx.ones((4, 8), dtype=mx.bfloat16),
                                                           "s": mx.zeros((3,), dtype=mx.uint32)})
    spans = check_safetensors(tmp_path / "np.safetensors")
    assert sorted(spans) == sorted(arrays) and spans["a"][1] - spans["a"][0] == 48
    assert sorted(check_safetensors(tmp_path / "mx.safetensors")) == ["s", "w"]
    check_weight_files(tmp_path)


# ---------------------------------------------------------------- GGUF

def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def tinfo(name, dims, gtype: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}q", len(dims), *dims) + struct.pack("<IQ", gtype, offset)


ARCH = kv("general.architecture", 8, gstr("llama"))
TOKENS = kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("b"))


def gguf(kvs=None, tensors=None, data=None, version=3, magic=b"GGUF", n_tensors=None, n_kv=None,
         align=32, cut=None) -> bytes:
    """A GGUF written from the spec: header, metadata, tensor infos, padding, data (F32 'w' of 8 by default)."""
    kvs = [ARCH, TOKENS] if kvs is None else kvs
    tensors = [tinfo("w", [8])] if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    blob = head + bytes(-len(head) % align) + (bytes(32) if data is None else data)
    return blob if cut is None else blob[:cut]


U32_ALIGN = lambda v: kv("general.alignment", 4, struct.pack("<I", v))  # noqa: E731
GGUF_CASES = [
    ("empty-file", lambda: b"", "magic needs 4 bytes but only 0"),
    ("bad-magic", lambda: gguf(magic=b"GGML"), "magic is b'GGML'"),
    ("version-1", lambda: gguf(version=1), "GGUF version 1 is not supported"),
    ("version-99", lambda: gguf(version=99), "GGUF version 99 is not supported"),
    ("big-endian", lambda: gguf(version=3 << 24), "big-endian"),
    ("tensor-count-2^63", lambda: gguf(n_tensors=2**63), "impossible counts"),
    ("kv-count-2^60", lambda: gguf(n_kv=2**60), "impossible counts"),
    ("key-length-2^62", lambda: gguf(kvs=[struct.pack("<Q", 2**62) + b"general"]), "at most 65535 allowed"),
    ("string-length-2^63", lambda: gguf(kvs=[gstr("general.name") + struct.pack("<IQ", 8, 2**63)]),
     "value of 'general.name' needs 9223372036854775808 bytes"),
    ("value-type-13", lambda: gguf(kvs=[kv("general.x", 13, b"\0" * 8)]), "value type 13, not a GGUF type"),
    ("array-element-type-99", lambda: gguf(kvs=[kv("a", 9, struct.pack("<IQ", 99, 1))]), "element type 99"),
    ("array-count-2^60", lambda: gguf(kvs=[kv("a", 9, struct.pack("<IQ", 4, 2**60))]),
     "array 'a' of 1152921504606846976 elements needs"),
    ("string-array-count-2^40", lambda: gguf(kvs=[kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**40))]),
     "elements needs"),
    ("arrays-nested-10", lambda: gguf(kvs=[kv("a", 9, struct.pack("<IQ", 9, 1) * 10 + struct.pack("<IQ", 4, 0))]),
     "nests arrays more than 8 deep"),
    ("n-dims-0", lambda: gguf(tensors=[tinfo("w", [])]), "has 0 dimensions"),
    ("n-dims-5", lambda: gguf(tensors=[tinfo("w", [1, 1, 1, 1, 8])]), "has 5 dimensions"),
    ("dim-negative", lambda: gguf(tensors=[tinfo("w", [-8])]), "has dimension -8"),
    ("dim-zero", lambda: gguf(tensors=[tinfo("w", [8, 0])]), "has dimension 0"),
    ("dims-overflow", lambda: gguf(tensors=[tinfo("w", [2**40, 2**40])]), "overflow 64 bits"),
    ("ggml-type-removed-4", lambda: gguf(tensors=[tinfo("w", [8], gtype=4)]), "ggml type 4, not a known type"),
    ("ggml-type-9999", lambda: gguf(tensors=[tinfo("w", [8], gtype=9999)]), "ggml type 9999"),
    ("row-not-block-multiple", lambda: gguf(tensors=[tinfo("w", [33], gtype=2)]),
     "row length 33 is not a multiple of its type's block size 32"),
    ("offset-misaligned", lambda: gguf(tensors=[tinfo("w", [4]), tinfo("v", [4], offset=16)]),
     "not aligned to 32 bytes"),
    ("alignment-not-power-of-2", lambda: gguf(kvs=[ARCH, U32_ALIGN(24)]),
     "general.alignment must be a uint32 power of two"),
    ("alignment-zero", lambda: gguf(kvs=[ARCH, U32_ALIGN(0)]), "power of two, got 0"),
    ("alignment-wrong-type", lambda: gguf(kvs=[ARCH, kv("general.alignment", 10, struct.pack("<Q", 32))]), "(type 10)"),
    ("tensor-past-eof", lambda: gguf(tensors=[tinfo("w", [1024])]), "truncated file or bad offset"),
    ("offset-2^63", lambda: gguf(tensors=[tinfo("w", [8], offset=2**63)]), "truncated file or bad offset"),
    ("tensors-overlap", lambda: gguf(tensors=[tinfo("a", [16]), tinfo("b", [16], offset=32)], data=bytes(128)),
     "overlaps 'a'"),
    ("duplicate-key", lambda: gguf(kvs=[ARCH, ARCH]), "'general.architecture' appears twice"),
    ("duplicate-tensor", lambda: gguf(tensors=[tinfo("w", [8]), tinfo("w", [8], offset=32)], data=bytes(64)),
     "tensor name 'w' appears twice"),
    ("tensor-name-100", lambda: gguf(tensors=[tinfo("w" * 100, [8])]), "at most 63 allowed"),
    ("key-not-utf8", lambda: gguf(kvs=[kv(b"general.\xff", 4, b"\0" * 4)]), "is not UTF-8"),
    ("cut-in-metadata", lambda: gguf(kvs=[ARCH, kv("general.description", 8, gstr("x" * 200))], cut=150),
     "value of 'general.description' needs 200 bytes but only 42"),
    ("cut-in-tensor-info", lambda: gguf(kvs=[ARCH], tensors=[tinfo("w", [8]), tinfo("v", [8], offset=32)],
                                        cut=24 + len(ARCH) + len(tinfo("w", [8])) + 10),
     "n_dims of 'v' needs 4 bytes but only 1"),
]


@pytest.mark.parametrize("make,fragment", [c[1:] for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_hostile_gguf_refused(tmp_path, make, fragment):
    f = tmp_path / "model.gguf"
    f.write_bytes(make())
    with pytest.raises(UntrustedFileError, match="not a readable GGUF file") as e:
        check_gguf(f)
    assert str(f) in str(e.value) and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["bad-magic", "tensor-count-2^63", "string-length-2^63",
                                  "ggml-type-9999", "row-not-block-multiple", "tensor-past-eof"])
def test_gguf_reference_reader_refuses_too(tmp_path, case):
    """gguf-py's reader refuses these as well (it accepts some others llama.cpp refuses: 0 or 5
    dimensions, a zero dimension, misaligned or overlapping tensors, 100-character names)."""
    from gguf import GGUFReader

    f = tmp_path / "model.gguf"
    f.write_bytes(dict((c[0], c[1]) for c in GGUF_CASES)[case]())
    with pytest.raises((ValueError, IndexError)):
        GGUFReader(str(f))


@pytest.mark.parametrize("case", ["tensor-count-2^63", "string-length-2^63", "alignment-not-power-of-2",
                                  "tensor-past-eof"])
def test_base_phase_refuses_hostile_gguf_before_transformers(tmp_path, case):
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    f = tmp_path / "user.gguf"
    f.write_bytes(dict((c[0], c[1]) for c in GGUF_CASES)[case]())
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "model.source": str(f)}, env={})
    with pytest.raises(UntrustedFileError, match="user.gguf"):
        fetch_base_model(cfg)
    assert not (tmp_path / "t" / "base").exists()


def test_valid_gguf_pass_and_agree_with_gguf_py(tmp_path, smol):
    from gguf import GGUFReader, GGUFWriter

    # Our spec-built file (default case) is what gguf-py reads too.
    ours = tmp_path / "ours.gguf"
    ours.write_bytes(gguf())
    assert check_gguf(ours)["architecture"] == "llama"
    assert [t.name for t in GGUFReader(str(ours)).tensors] == ["w"]

    w = GGUFWriter(str(tmp_path / "writer.gguf"), "llama")
    w.add_custom_alignment(64)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc"])
    w.add_array("some.floats", [1.0, 2.0])
    w.add_tensor("a", np.ones((3, 5), np.float32))
    w.add_tensor("b", np.ones(7, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path, reader in ((tmp_path / "writer.gguf", GGUFReader(str(tmp_path / "writer.gguf"))), smol):
        summary = check_gguf(path)
        assert summary["tensor_count"] == len(reader.tensors)
        assert summary["kv_count"] == len(reader.fields) - 3  # gguf-py lists the 3 header fields too
        assert summary["data_offset"] == reader.data_offset
        assert summary["architecture"] == "llama"
    assert check_gguf(tmp_path / "writer.gguf")["alignment"] == 64


# ---------------------------------------------------------------- JSONL rows (phase 01)

def chat(i):
    return json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})


def J(name, line, fragment, **marks):
    return pytest.param(line, fragment, id=name, **marks)


JSONL_CASES = [
    J("truncated-row", '{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    J("row-is-array", "[1, 2, 3]", "row is not a JSON object"),
    J("bad-role", '{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot' not one of"),
    J("content-not-string",
      '{"messages": [{"role": "user", "content": {"$eval": 1}}, {"role": "assistant", "content": "a"}]}',
     "messages[0].content must be a string"),
    J("empty-messages", '{"messages": []}', "'messages' must be a non-empty list"),
    J("completion-only", '{"completion": "x"}', "need both 'prompt' and 'completion'"),
    J("mixed-formats", '{"text": "plain"}', "differs from the file's format 'chat'"),
    J("invalid-utf8", b'{"text": "\xff\xfe"}', "not UTF-8"),
    J("nested-100k", "[" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize("line,fragment", JSONL_CASES)
def test_malformed_jsonl_refused(tmp_path, line, fragment):
    from pipeline.phases.p01_prepare_data import load_input

    f = tmp_path / "data.jsonl"
    body = [chat(i).encode() for i in range(4)]
    body.insert(2, line if isinstance(line, bytes) else line.encode())
    f.write_bytes(b"\n".join(body) + b"\n")
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "data.source": str(f)}, env={})
    with pytest.raises(DataError, match="nothing was written") as e:
        load_input(cfg)
    assert f"{f}:3:" in str(e.value) and fragment in str(e.value), str(e.value)


# ---------------------------------------------------------------- chat templates

TEMPLATE_CASES = [
    ("mro-subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("cycler-globals", "{{ cycler.__init__.__globals__ }}", "SecurityError"),
    ("joiner-globals-os", "{{ joiner.__init__.__globals__.os.system('true') }}", "SecurityError"),
    ("template-reference-context", "{{ self._TemplateReference__context.cycler.__init__ }}", "SecurityError"),
    ("raise-exception-globals", "{{ raise_exception.__globals__ }}", "SecurityError"),
    ("attr-filter-class", "{{ (messages | attr('__class__')).__base__ }}", "SecurityError"),
    ("format-string-attr", "{{ '{0.__class__.__base__}'.format(messages) }}", "SecurityError"),
    ("message-content-class", "{{ messages[0].content.__class__.__base__.__subclasses__() }}", "SecurityError"),
    ("list-mutation", "{% set x = [] %}{{ x.append(1) }}", "SecurityError"),
    ("lipsum-removed", "{{ lipsum.__globals__ }}", "UndefinedError"),
    ("raise-exception", "{{ raise_exception('no system role') }}", "no system role"),
    ("syntax-error", "{% for %}", "TemplateSyntaxError"),
    ("huge-range", "{% for i in range(10**9) %}{% endfor %}", "range() of 1,000,000,000 numbers (limit 10,000)"),
    ("nested-loops-1e8", "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
     "more than 1,000,000 loop iterations"),
    ("loop-over-big-string", "{% set s = 'x' * 900000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
     "loop iterations"),
    ("slow-body-time-limit", "{% for i in range(10000) %}{% for j in range(90) %}{% set s = 'x' * 900000 %}"
     "{% set t = s.upper() %}{% endfor %}{% endfor %}", "time limit"),
    ("huge-output", "{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}",
     "output passed the 1,000,000-character limit"),
    ("string-repeat", "{{ 'x' * 10**9 }}", "repeats a sequence 1,000,000,000 times"),
    ("concat-doubling", "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "built a str of length"),
    ("plus-doubling", "{% set ns = namespace(s=['x']) %}{% for i in range(64) %}"
     "{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "built a list of length"),
    ("percent-width", "{{ '%999999999s' % 'x' }}", "format string has a width of 999999999"),
    ("format-width", "{{ '{:999999999}'.format(1) }}", "format string has a width"),
    ("percent-star-width", "{{ '%*s' % (10**9, 'x') }}", "passed the number 1000000000"),
    ("format-nested-width", "{{ '{:{w}}'.format(1, w=10**9) }}", "passed the number 1000000000"),
    ("ljust-argument", "{{ 'x'.ljust(10**9) }}", "passed the number 1000000000"),
    ("center-filter", "{{ 'x' | center(10**9) }}", "passed the number 1000000000"),
    ("power-bomb", "{{ 9 ** 999999999 }}", "raises 9 to the power 999999999"),
    ("macro-recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("template-too-large", "x" * 1_000_001, "1,000,001 characters (limit 1,000,000)"),
]


@pytest.mark.parametrize("template,fragment", [c[1:] for c in TEMPLATE_CASES], ids=[c[0] for c in TEMPLATE_CASES])
def test_hostile_chat_template_refused(template, fragment):
    with pytest.raises(PipelineError, match="its chat template does not render") as e:
        render_chat(template, [{"role": "user", "content": "hi"}], {"bos_token": "<s>"})
    assert fragment in str(e.value), str(e.value)


# Each writes MARKER through Python internals when rendered by an unsandboxed jinja2.Environment.
PAYLOADS = [
    "{{ cycler.__init__.__globals__.__builtins__['open'](MARKER, 'w').write('pwned') }}",
    "{{ self._TemplateReference__context.joiner.__init__.__globals__.__builtins__['open'](MARKER, 'w').write('x') }}",
    "{{ namespace.__init__.__globals__.__builtins__.open(MARKER, 'w').write('x') }}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_template_payload_executes_nothing(tmp_path, payload):
    import jinja2

    control = tmp_path / "control"
    jinja2.Environment().from_string(payload).render(MARKER=str(control))
    assert control.read_text()  # the payload is live outside the sandbox
    marker = tmp_path / "marker"
    with pytest.raises(PipelineError, match="SecurityError"):
        render_chat(payload, [], {"MARKER": str(marker)})
    assert not marker.exists()


def test_real_templates_still_render_through_p10(smol):
    """The sandbox and its guards leave real templates working, through the names phase 10 uses."""
    from pipeline.phases import p10_verify_gguf as p10

    field = smol[1].fields["tokenizer.chat_template"]
    smol = bytes(field.parts[field.data[0]]).decode()
    messages = [{"role": "user", "content": "Zoë"}, {"role": "assistant", "content": "hi"}]
    text = p10.render_chat(smol, messages, {}, True)
    assert "<|im_start|>user\nZoë<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert (p10._jinja(smol).render(messages=messages, add_generation_prompt=False)
            == text[:-len("<|im_start|>assistant\n")])
    loops = ("{% for m in messages if m.role != 'system' recursive %}{{ loop.index }}/{{ loop.length }}:"
             "{{ m['content'] | tojson }}{% if loop.last %}.{% endif %}{% else %}none{% endfor %}"
             "{{ ('%s|%5s' % ('a', 'b')) ~ '{:>4}'.format(7) ~ 'x'.ljust(3) ~ (2 ** 10) }}")
    assert render_chat(loops, messages, {}) == '1/2:"Zoë"2/2:"hi".a|    b   7x  1024'
    assert render_chat(loops, [], {}) == "nonea|    b   7x  1024"


# ---------------------------------------------------------------- custom code, offline Hub

def _model_folder(root: Path, model_type: str) -> Path:
    d = root / f"custom-{model_type}"
    d.mkdir()
    marker = root / "imported"
    (d / "config.json").write_text(json.dumps({
        "model_type": model_type, "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"},
        "hidden_size": 64, "num_hidden_layers": 1, "rope_theta": 10000.0}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok_evil.T", None]}}))
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (d / "model.safetensors").write_bytes(st())
    return d


def test_custom_code_refused_for_unknown_architecture(tmp_path):
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    src = _model_folder(tmp_path, "evilformer")
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "model.source": str(src)}, env={})
    with pytest.raises(PipelineError, match="trust_remote_code=True, which this pipeline never sets") as e:
        fetch_base_model(cfg)
    assert "modeling_evil.py" in str(e.value) and "'evilformer'" in str(e.value)
    assert not (tmp_path / "imported").exists() and not (tmp_path / "t" / "base").exists()


def test_custom_code_ignored_for_registry_architecture(tmp_path):
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    src = _model_folder(tmp_path, "llama")
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "model.source": str(src)}, env={})
    out = fetch_base_model(cfg).path
    assert not list(out.glob("*.py")) and not (tmp_path / "imported").exists()
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text())


def test_local_folder_with_hostile_safetensors_refused(tmp_path):
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    src = _model_folder(tmp_path, "llama")
    (src / "model.safetensors").write_bytes(st(n=2**63))
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "model.source": str(src)}, env={})
    with pytest.raises(UntrustedFileError, match="exceeds the 100000000-byte limit"):
        fetch_base_model(cfg)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this opens (creates) the marker file
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_checkpoint_refused_unopened(tmp_path, name):
    import pickle

    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    src, marker = tmp_path / "pickled", tmp_path / "unpickled"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "t", "model.source": str(src)}, env={})
    with pytest.raises(MissingInputError, match=f"It has {name}: pickle checkpoints are not loaded"):
        fetch_base_model(cfg)
    assert not marker.exists()
    pickle.loads((src / name).read_bytes()).close()  # control: the payload is live when unpickled
    assert marker.exists()


OFFLINE_PROBE = textwrap.dedent("""
    import socket, sys
    attempts = []
    def record(name):
        def refuse(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network disabled by the test ({name})")
        return refuse
    socket.socket.connect = record("connect")
    socket.socket.connect_ex = record("connect_ex")
    socket.create_connection = record("create_connection")
    socket.getaddrinfo = record("getaddrinfo")
    from pipeline.config import load_config
    from pipeline.errors import PipelineError
    from pipeline.phases.p02_fetch_base_model import fetch_base_model
    cfg = load_config(None, {"models_dir": sys.argv[1], "run": "t", "model.source": "nobody/no-such-model"}, env={})
    try:
        fetch_base_model(cfg)
        print("RESULT fetched")
    except PipelineError as e:
        print("RESULT", type(e).__name__, e)
    print("ATTEMPTS", len(attempts), sorted(set(attempts)))
""")


def _probe(tmp_path: Path, offline: bool) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2", HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-c", OFFLINE_PROBE, str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=HANG_S - 1)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_hub_offline_opens_no_socket(tmp_path):
    out = _probe(tmp_path, offline=True)
    assert ("RESULT MissingInputError" in out
            and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in out), out
    assert "ATTEMPTS 0 []" in out, out
    # Control: without HF_HUB_OFFLINE the same probe does try the network (so the probe can see it).
    online = _probe(tmp_path, offline=False)
    assert "ATTEMPTS 0" not in online, online
