"""Render a chat template, untrusted input (it comes inside a GGUF or a tokenizer_config.json).

Compiled as transformers does (trim_blocks, lstrip_blocks, loopcontrols, `{% generation %}`,
tojson, raise_exception, strftime_now) but in jinja2's immutable sandbox (no `_` attributes, no
`__globals__`, no mutating lists or dicts), with limits no template can talk its way past:
- time: every call, attribute, item, operator, loop step and output chunk checks a deadline;
- loops: every `for` is rewritten to count its steps against a per-render budget, `range` is capped;
- size: the output, and every string or list built by an operator, filter or call, is capped, and
  integer arguments and format widths above that cap are refused before Python allocates them.
Any failure is a PipelineError starting "its chat template does not render".
"""

from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ..errors import PipelineError

MAX_SECONDS = 1.0  # real templates render in milliseconds
MAX_SIZE = 1_000_000  # characters of output; items of any string or list a template builds
MAX_RANGE = 10_000
MAX_STEPS = 1_000_000  # loop iterations per render
MAX_TEMPLATE = 1_000_000  # characters of template source
LOOP_GUARD, SIZE_GUARD = "_untrusted_loop_guard", "_untrusted_size_guard"
SEQUENCES = (str, list, tuple)
_WIDE = re.compile(r"\d{7,}")  # a format width/precision of a million or more
_ARG_WIDTH = re.compile(r"%[-+ #0]*\*|\{[^{}]*\{")  # '%*s', '{:{w}}': the width is an argument


class TemplateLimitError(jinja2.TemplateError):
    """A template went past one of the limits above."""


class _Budget:
    def __init__(self):
        self.deadline, self.steps = time.monotonic() + MAX_SECONDS, 0

    def tick(self, steps: int = 0) -> None:
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(f"it ran more than {MAX_STEPS:,} loop iterations (limit)")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran past the {MAX_SECONDS:g} s time limit")


_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _tick(steps: int = 0) -> None:
    if (budget := _BUDGET.get()) is not None:  # None while compiling (constant folding)
        budget.tick(steps)


def _sized(value):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_SIZE:
        raise TemplateLimitError(f"it built a {type(value).__name__} of length {len(value):,} (limit {MAX_SIZE:,})")
    return value


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if type(a) is int and abs(a) > MAX_SIZE:
            raise TemplateLimitError(f"it passed the number {a} (size limit {MAX_SIZE:,})")


def _check_format(fmt, args=(), kwargs=None) -> None:
    if not isinstance(fmt, str):
        return
    if wide := _WIDE.search(fmt):
        raise TemplateLimitError(f"its format string has a width of {wide.group()} (limit {MAX_SIZE:,})")
    if _ARG_WIDTH.search(fmt):
        _check_args(args, kwargs or {})


def _check_binop(op: str, left, right) -> None:
    if op == "*":
        seq, count = (left, right) if isinstance(left, SEQUENCES) else (right, left)
        if isinstance(seq, SEQUENCES) and isinstance(count, int) and len(seq) * count > MAX_SIZE:
            raise TemplateLimitError(f"it repeats a sequence {count:,} times (size limit {MAX_SIZE:,})")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right * abs(left).bit_length() > 64 * MAX_SIZE:
            raise TemplateLimitError(f"it raises {left} to the power {right} (size limit)")
    elif op == "%":
        _check_format(left, right if isinstance(right, tuple) else (right,))


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the budget checked on every operation that goes through it."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        if isinstance(getattr(obj, "__self__", None), SEQUENCES):  # 'x'.ljust(10**9), 'x'.center(...)
            _check_args(args, kwargs)
        return _sized(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        _tick()
        _check_binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def unsafe_undefined(self, obj, attribute):
        # jinja2 returns an Undefined that renders as '' (so `{{ f.__globals__ }}` passes silently): refuse.
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args, **kwargs):
            _check_format(value.__self__, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked


class _Generation(Extension):  # {% generation %}: transformers' assistant-mask tag, rendered as is
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _Guard(NodeTransformer):
    """Route every loop's iterable and every `~` concatenation through the budget filters."""

    def __init__(self, env):
        self.env = env

    def _wrap(self, node, name):
        return nodes.Filter(node, name, [], [], None, None).set_lineno(node.lineno).set_environment(self.env)

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, LOOP_GUARD)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return self._wrap(node, SIZE_GUARD)


@jinja2.pass_context  # pass_context: never constant-folded at compile time
def _loop_guard(context, iterable):
    for item in iterable:
        _tick(1)
        yield item


@jinja2.pass_context
def _size_guard(context, value):
    return _sized(value)


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateLimitError(f"it asked for range() of {len(r):,} numbers (limit {MAX_RANGE:,})")
    return r


def _guard_filter(name, f):
    value_at = 1 if getattr(f, "jinja_pass_arg", None) else 0  # after jinja's context/environment

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marker
    def guarded(*args, **kwargs):
        _tick()
        _check_args(args[value_at + 1:], kwargs)  # widths, counts: not the value being filtered
        if name == "format":
            _check_format(args[value_at], args[value_at + 1:], kwargs)
        return _sized(f(*args, **kwargs))

    return guarded


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {k: _guard_filter(k, f) for k, f in env.filters.items()}
    env.filters.update({LOOP_GUARD: _loop_guard, SIZE_GUARD: _size_guard})
    env.globals.pop("lipsum", None)  # generates text in one call: nothing a chat template needs
    env.globals.update(range=_range, raise_exception=_raise_exception,
                       strftime_now=lambda f: datetime.now().strftime(f))
    return env


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per template text; raises PipelineError for a template that does not parse."""
    if len(template) > MAX_TEMPLATE:
        raise PipelineError(f"its chat template does not render: it is {len(template):,} characters "
                            f"(limit {MAX_TEMPLATE:,}).")
    env = _environment()
    try:
        return env.from_string(_Guard(env).visit(env.parse(template)))
    except Exception as e:  # a syntax error, or a parser recursion on absurd nesting
        raise PipelineError(f"its chat template does not render ({type(e).__name__}: {e}).") from None


def render_chat(template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = False) -> str:
    """Render in the sandbox under the limits; any failure is a PipelineError naming it."""
    compiled = compile_template(template)
    token = _BUDGET.set(_Budget())
    out, size = [], 0
    try:
        for chunk in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **special_tokens):
            size += len(chunk)
            if size > MAX_SIZE:
                raise TemplateLimitError(f"its output passed the {MAX_SIZE:,}-character limit")
            _tick()
            out.append(chunk)
    except Exception as e:  # the template's own error (raise_exception, SecurityError, TypeError, limits...)
        raise PipelineError(f"its chat template does not render ({type(e).__name__}: {e}).") from None
    finally:
        _BUDGET.reset(token)
    return "".join(out)
