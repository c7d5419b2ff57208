"""An Ollama Modelfile TEMPLATE (Go text/template) and its stop strings, read off a Jinja chat template.

    result = to_ollama(chat_template, {"bos_token": ..., "eos_token": ...}, add_bos=True)
    # Modelfile: TEMPLATE \"\"\"<result.template>\"\"\", one `PARAMETER stop "<s>"` per result.stops

The Go template is not translated from the Jinja source, it is read off renderings: the Jinja template
(in our sandbox, `render_chat`) renders probe conversations whose contents are unique markers, and the
text between two contents ("glue") is recorded by (role before, role after; the first message has no
role before), the text after the last content by the last two roles. The Go template is that table over
`.Messages`, written with Go's builtins only. Then the table renders some ninety other conversations
(1-5 messages, with and without a system message, ending in a user message with the generation prompt
or in an assistant message without it, contents with newlines, quotes, `{{`, unicode) and must match
the Jinja rendering byte for byte; otherwise TemplateNotTranslatable names the first difference, and
the caller keeps the GGUF's own template.

Byte-identical to the Jinja rendering minus the BOS the runtime adds: when the GGUF's
`tokenizer.ggml.add_bos_token` is true (add_bos=True), llama.cpp and Ollama prepend BOS themselves,
so a leading bos_token text that the Jinja template prints (Llama 3) is not in the Go template.

Ollama's side (ollama/template Execute): a template that names .Messages gets the chat's messages
after Ollama's collate step, which joins consecutive messages of one role with a blank line;
`ollama_data` builds the same data, so the table needs no same-role pairs. The generation prompt
(Jinja's add_generation_prompt) is rendered when the last message is not the assistant's.

Limits, reported in `warnings` instead of rendering differently in silence:
- today's date (strftime_now; Llama 3.2, Granite 3.x): Go's builtins have no clock, so the TEMPLATE
  holds the install date as fixed text;
- whitespace at the ends of a content that Jinja strips (Llama 3's |trim): Go's builtins cannot trim;
- an empty content that Jinja treats apart (Granite 4.0 prints its default system prompt instead);
- a system message after the first message, where only that keeps a template from translating (DeepSeek
  and SmolLM3 move or drop it): the table is then read and checked without such messages;
- conversations the Jinja template refuses (raise_exception; Gemma 2 has no system role): the role steps
  only they contain print no text;
- tools: only system, user and assistant messages with text content are translated; tool definitions,
  tool calls and tool messages are not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product

from .errors import PipelineError
from .untrusted.chat_template import render_chat

ROLES = ("system", "user", "assistant")
START = ""  # the role before the first message
PROBE_TURNS = 3  # the table is read off every role sequence up to this length...
CHECK_TURNS = 5  # ...and checked on every one up to this length
# Check contents: none starts or ends with whitespace (probed apart, see _edge_warnings).
CHECK_CONTENTS = (
    "Hello there.",
    "line one\nline two\n\n  indented line four",
    "She said \"yes\", then 'no' and `maybe`.",
    "Go and Jinja syntax: {{ .Content }} {{- end }} {% if x %} {# note #} }}{{",
    "unicode: héllo wörld, 日本語, emoji 🙂, שלום",
    "a\ttab, a back\\slash, a lone < and >, &amp;",
    "looks special: <|im_end|><|eot_id|><|end_of_text|>",
)
_MARKER = "\u27e6msg{}\u27e7"  # lower-case letters: a template that changes case is caught
_DATE = "\u27e6date {}\u27e7"
_DATE_FOUND = re.compile("\u27e6date (.*?)\u27e7")
_SPECIAL_SHAPE = re.compile(r"<\|[^|\s]+\|>|</?[A-Za-z_][\w-]*>")  # <|eot_id|>, <end_of_turn>, </s>


class TemplateNotTranslatable(PipelineError):
    """The chat template renders something a table of role-to-role texts cannot reproduce."""


@dataclass
class OllamaTemplate:
    template: str  # Go text/template for the Modelfile's TEMPLATE
    stops: list[str]  # PARAMETER stop values
    warnings: list[str] = field(default_factory=list)  # where Ollama's prompt can differ, and why


def to_ollama(jinja_template: str, special_tokens: dict, add_bos: bool,
              special_texts: set[str] | None = None) -> OllamaTemplate:
    """Translate, check against Jinja, or raise TemplateNotTranslatable naming the difference."""
    warnings = []
    try:
        jinja, glues = _translate(jinja_template, special_tokens, add_bos, mid_system=True)
    except TemplateNotTranslatable as full:
        # Many templates move or drop a system message that is not the first (DeepSeek, SmolLM3): Ollama
        # only sends one when a client does, so keep the rest of the template and say so.
        try:
            jinja, glues = _translate(jinja_template, special_tokens, add_bos, mid_system=False)
        except TemplateNotTranslatable:
            raise full from None
        warnings = [f"a system message after the first message is not translated (the TEMPLATE prints no text "
                    f"before it): {full}"]
    warnings += _edge_warnings(jinja, glues) + _bos_warnings(jinja) + _gap_warnings(jinja, glues)
    if re.search(r"\btool", jinja_template):
        warnings.append("tools are not translated: the TEMPLATE renders system, user and assistant messages "
                        "with text content; Ollama's .Tools, tool calls and tool messages get no tool syntax.")
    today = datetime.now()
    warnings = _date_warnings(glues, today) + [_dated(w, today) for w in warnings]
    glues = glues.dated(today)
    return OllamaTemplate(_go_template(glues), _stops(glues, special_tokens, special_texts), warnings)


def _translate(template: str, tokens: dict, add_bos: bool, mid_system: bool) -> tuple[_Jinja, _Glues]:
    jinja = _Jinja(template, dict(tokens), add_bos, mid_system)
    glues = _read_glues(jinja)
    _check(jinja, glues)
    return jinja, glues


def ollama_data(messages: list[dict]) -> dict:
    """What Ollama passes the TEMPLATE: its collate step joins consecutive same-role messages."""
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"Messages": collated}


# --- the Jinja side -------------------------------------------------------------------------------

@dataclass
class _Jinja:
    template: str
    tokens: dict
    add_bos: bool
    mid_system: bool  # probe system messages after the first one too
    refused: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    printed_bos: set[bool] = field(default_factory=set)

    def render(self, messages: list[dict]) -> str | None:
        """The rendering minus a runtime-added BOS; None where the template refuses the conversation."""
        variables = {**self.tokens, "strftime_now": _date_marker}
        try:
            out = render_chat(self.template, messages, variables, add_generation_prompt=_wants_reply(messages))
        except PipelineError as e:
            self.refused.append((_roles(messages), str(e)))
            return None
        bos = self.tokens.get("bos_token") or ""
        self.printed_bos.add(bool(bos) and out.startswith(bos))
        if self.add_bos and bos and out.startswith(bos):
            out = out[len(bos):]
        return out

    def sequences(self, max_turns: int):
        """The role sequences probed: up to max_turns long, no role twice in a row (Ollama collates those)."""
        for n in range(1, max_turns + 1):
            for roles in product(ROLES, repeat=n):
                if all(a != b and self.probes(a, b) for a, b in zip((START,) + roles, roles)):
                    yield roles

    def probes(self, before: str, role: str) -> bool:
        return self.mid_system or role != "system" or before == START

    def steps(self) -> list[tuple[str, str]]:
        """Every (role before, role) the table should have an entry for."""
        return [(b, r) for b, r in product((START,) + ROLES, ROLES) if b != r and self.probes(b, r)]


def _date_marker(fmt: str) -> str:
    """strftime_now's stand-in: where the date goes, and in which format (see _dated)."""
    return _DATE.format(fmt)


def _wants_reply(messages: list[dict]) -> bool:
    return messages[-1]["role"] != "assistant"


def _roles(messages: list[dict]) -> tuple[str, ...]:
    return tuple(m["role"] for m in messages)


# --- the table --------------------------------------------------------------------------------------

@dataclass
class _Glues:
    between: dict[tuple[str, str], str] = field(default_factory=dict)  # (role before, role) -> text
    end: dict[tuple[str, str], str] = field(default_factory=dict)  # (role before the last, last role) -> text
    source: dict = field(default_factory=dict)  # key -> the conversation it was read from

    def render(self, messages: list[dict]) -> str:
        """What the emitted Go template renders (a missing entry prints nothing, as there)."""
        out, before, prev = [], START, START
        for m in messages:
            out += [self.between.get((prev, m["role"]), ""), m["content"]]
            before, prev = prev, m["role"]
        return "".join(out) + self.end.get((before, prev), "")

    def dated(self, today: datetime) -> _Glues:
        return _Glues({k: _dated(t, today) for k, t in self.between.items()},
                      {k: _dated(t, today) for k, t in self.end.items()})

    def record(self, kind: str, key: tuple[str, str], text: str, roles: tuple[str, ...]) -> None:
        """Note the text at `key` of table `kind` ("between" or "end"); a second, different one is fatal."""
        table = getattr(self, kind)
        if key in table and table[key] != text:
            raise TemplateNotTranslatable(
                f"the chat template's text {_where(key, kind == 'end')} depends on more than the roles next to it: "
                f"conversation {self.source[kind, key]} vs {roles}, {_first_difference(table[key], text)}.")
        table[key] = text
        self.source.setdefault((kind, key), roles)


def _where(key, end: bool = False) -> str:
    before, role = key
    if end:
        return f"after a last {role} message" + (" that is the only one" if before == START
                                                 else f" after {_a(before)} one")
    return f"before a first {role} message" if before == START else f"between {_a(before)} and {_a(role)} message"


def _a(role: str) -> str:
    return ("an " if role[:1] in "aeiou" else "a ") + role


def _read_glues(jinja: _Jinja) -> _Glues:
    glues = _Glues()
    for roles in jinja.sequences(PROBE_TURNS):
        messages = [{"role": r, "content": _MARKER.format(i)} for i, r in enumerate(roles)]
        text = jinja.render(messages)
        if text is None:
            continue
        *between, end = _split(text, roles)
        for key, glue in zip(zip((START,) + roles[:-1], roles), between):
            glues.record("between", key, glue, roles)
        glues.record("end", ((START,) + roles)[-2:], end, roles)
    if not glues.end:
        _, error = jinja.refused[0]
        raise TemplateNotTranslatable(f"the chat template renders none of the probe conversations: {error}")
    return glues


def _split(text: str, roles: tuple[str, ...]) -> list[str]:
    """The texts around each message's marker; each marker must appear once, in message order."""
    pieces, at = [], 0
    for i, role in enumerate(roles):
        marker = _MARKER.format(i)
        found, count = text.find(marker), text.count(marker)
        if count != 1 or found < at:
            how = f"{count} times" if count != 1 else "before the message ahead of it"
            raise TemplateNotTranslatable(
                f"the chat template does not print each message's content once, in order (conversation {roles}: "
                f"the content of message {i + 1}, {role}, appears {how}).")
        pieces.append(text[at:found])
        at = found + len(marker)
    return pieces + [text[at:]]


def _check(jinja: _Jinja, glues: _Glues) -> None:
    for n, roles in enumerate(jinja.sequences(CHECK_TURNS)):
        messages = [{"role": r, "content": CHECK_CONTENTS[(n + i) % len(CHECK_CONTENTS)]} for i, r in enumerate(roles)]
        expected = jinja.render(messages)
        if expected is not None and (got := glues.render(messages)) != expected:
            raise TemplateNotTranslatable(
                f"the chat template renders conversation {roles} differently from its role-to-role texts: "
                f"{_first_difference(expected, got)}.")


def _first_difference(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    before = expected[max(0, at - 30):at]
    return f"after {before!r} Jinja has {expected[at:at + 40]!r}, the translation {got[at:at + 40]!r}"


# --- warnings -------------------------------------------------------------------------------------

def _edge_warnings(jinja: _Jinja, glues: _Glues) -> list[str]:
    """Contents the check leaves out: whitespace at the ends, and empty ones; each role in turn."""
    base = ("system", "user", "assistant", "user")
    cases = (("whitespace at the start or end of", lambda s: " \n" + s + "\n ",
              "Jinja changes it (e.g. |trim) and Go's builtins cannot, so Ollama's prompt keeps it"),
             ("an empty", lambda s: "",
              "Jinja renders it apart (e.g. a default system prompt); the TEMPLATE prints the usual texts around it"))
    warnings = []
    for what, change, why in cases:
        differing = []
        for role in ROLES:
            messages = [{"role": r, "content": change(c) if r == role else c} for r, c in zip(base, CHECK_CONTENTS)]
            expected = jinja.render(messages)
            if expected is not None and (got := glues.render(messages)) != expected:
                differing.append((role, _first_difference(expected, got)))
        if differing:
            roles = ", ".join(role for role, _ in differing)
            warnings.append(f"{what} {roles} message content renders differently: {why} "
                            f"(conversation {base}, {differing[0][1]}).")
    return warnings


def _bos_warnings(jinja: _Jinja) -> list[str]:
    bos = jinja.tokens.get("bos_token")
    if jinja.add_bos and bos and False in jinja.printed_bos:
        return [f"the runtime adds BOS {bos!r} (add_bos_token) but the Jinja template does not print it: "
                "Ollama's prompt starts with one BOS more than the Jinja rendering."]
    return []


def _gap_warnings(jinja: _Jinja, glues: _Glues) -> list[str]:
    """Role steps the Jinja template refused to render: the TEMPLATE prints nothing at them."""
    steps = jinja.steps()
    missing = [f"{b or 'start'}->{r}" for b, r in steps if (b, r) not in glues.between]
    missing += [f"end after {b or 'start'}->{r}" for b, r in steps if (b, r) not in glues.end]
    if not missing:
        return []
    roles, error = jinja.refused[0]
    return [f"the Jinja template refuses some conversations (e.g. {roles}: {error}); the TEMPLATE prints no text "
            f"at these role steps: {', '.join(missing)}."]


def _date_warnings(glues: _Glues, today: datetime) -> list[str]:
    texts = list(glues.between.values()) + list(glues.end.values())
    formats = sorted({f for t in texts for f in _DATE_FOUND.findall(t)})
    return [f"the chat template prints today's date (strftime_now({f!r})); Go's builtins have no clock, so the "
            f"TEMPLATE holds the install date {today.strftime(f)!r} as fixed text: reinstall to update it."
            for f in formats]


def _dated(text: str, today: datetime) -> str:
    """The install date where the Jinja template printed today's date."""
    return _DATE_FOUND.sub(lambda m: today.strftime(m.group(1)), text)


# --- stops ----------------------------------------------------------------------------------------

def _stops(glues: _Glues, tokens: dict, special_texts: set[str] | None) -> list[str]:
    """The special token that ends an assistant turn (start of every text after assistant content), and EOS."""
    after = [t for (before, _), t in glues.between.items() if before == "assistant"]
    after += [t for (_, last), t in glues.end.items() if last == "assistant"]
    turn_end = os.path.commonprefix(after) if after else ""
    if special_texts:
        token = max((s for s in special_texts if s and turn_end.startswith(s)), key=len, default=None)
    else:
        token = m.group() if (m := _SPECIAL_SHAPE.match(turn_end)) else None
    stops = [token] if token else []
    eos = tokens.get("eos_token")
    return stops + [eos] if eos and eos not in stops else stops


# --- the Go template ------------------------------------------------------------------------------

def _go_template(glues: _Glues) -> str:
    """The table as if/else chains over the roles of the message before ($prev) and the one before that
    ($before): Go templates have no arithmetic to index a previous message, so the loop carries them."""
    between = {b: _switch(".Role", {r: glues.between.get((b, r), "") for r in ROLES}) for b in (START,) + ROLES}
    return _join([("do", '$before := ""'), ("do", '$prev := ""'), ("do", "range .Messages"),
                  *_switch("$prev", between), ("do", ".Content"),
                  ("do", "$before = $prev"), ("do", "$prev = .Role"), ("do", "end"),
                  *_switch("$prev", {last: _end_of(glues, last) for last in ROLES})])


def _end_of(glues: _Glues, last: str):
    """The text after a last `last` message: one text, or a chain over $before where that matters."""
    texts = {b: glues.end.get((b, last)) for b in (START,) + ROLES if b != last}
    if len(set(texts.values())) == 1:  # the same after every role, and none refused
        return next(iter(texts.values()))
    return _switch("$before", {b: t or "" for b, t in texts.items()})


def _switch(subject: str, cases: dict) -> list:
    """`if eq subject "k"` ... `else if` ... `end` over the cases with something to print."""
    tokens = []
    for key, body in cases.items():
        if body:
            word = "else if" if tokens else "if"
            tokens += [("do", f"{word} eq {subject} {_go_string(key)}"),
                       *([("text", body)] if isinstance(body, str) else body)]
    return tokens + [("do", "end")] if tokens else []


def _join(tokens: list) -> str:
    """Actions on their own indented lines, trimmed with `{{-`, except right after literal text.

    Literal text stays raw where that is safe and readable; otherwise it becomes a Go string action."""
    out, depth, after_text = [], 0, False
    for kind, value in tokens:
        if kind == "text" and _raw_ok(value):
            out.append(value)
            after_text = True
            continue
        action = _go_string(value) if kind == "text" else value
        word = action.split()[0]
        depth -= word in ("end", "else")
        # `{{-` would eat the whitespace the glue text ends with; a newline is only added before it.
        out.append("{{ " + action + " }}" if after_text
                   else ("\n" if out else "") + "  " * depth + "{{- " + action + " }}")
        depth += word in ("if", "range", "else")
        after_text = False
    return "".join(out)


def _raw_ok(text: str) -> bool:
    """Raw in the template: no Go delimiters, nothing the Modelfile parser drops or ends a \"\"\" string on."""
    return ("{{" not in text and "}}" not in text and not text.endswith("{") and '"""' not in text
            and all(c.isprintable() or c in "\n\t" for c in text))


def _go_string(text: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    chars = (escapes.get(c) or (c if c.isprintable() else f"\\U{ord(c):08x}") for c in text)
    return '"' + "".join(chars) + '"'
