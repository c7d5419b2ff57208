"""Ollama TEMPLATE parity: Go's own text/template renders what the Jinja chat template renders.

    .venv/bin/pytest -q tests/test_ollama_template.py

For SmolLM2's ChatML template and llama.cpp's copies of the Llama 3.1, Llama 3.2, Granite 3.3 and
Granite 4.0 templates (in the converter cache, `python -m pipeline.llamacpp fetch`), `to_ollama`
translates; then Jinja (`render_chat`) and Go (tests/go_template/render.go, built once per session)
render the same conversations, which must be byte-identical minus the BOS the runtime adds. Every
text of every emitted template is changed in turn to show the parity check would catch it.
Needs Go: `make setup` installs golang-go; without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from pipeline import llamacpp
from pipeline.errors import PipelineError
from pipeline.ollama_template import TemplateNotTranslatable, ollama_data, to_ollama
from pipeline.untrusted.chat_template import render_chat

RENDER_GO = Path(__file__).parent / "go_template" / "render.go"
LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
GRANITE = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"}
# name -> (file in llama.cpp's models/templates, or None for SmolLM2's own; special tokens; add_bos_token)
CASES = {
    "smollm2": (None, None, False),  # its template and tokens: from its tokenizer folder
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3, True),
    "llama-3.1-no-add-bos": ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3, False),
    "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3, True),
    "granite-3.3": ("ibm-granite-granite-3.3-2B-Instruct.jinja", GRANITE, False),
    "granite-4.0": ("ibm-granite-granite-4.0.jinja", GRANITE, False),
}


def S(text):
    return {"role": "system", "content": text}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


# Between them every role pair, every first role and every (role before, last role) appears.
CONVERSATIONS = [
    [U("What is 2+2?")],
    [S("You answer in JSON."), U('Give {"a": 1} back, and a "quote".')],
    [S("Be terse."), U("Name a colour."), A("Blue.")],
    [U("Hi!"), A("Hello! How can I help?"), U("Tell me a joke\nabout Go templates.")],
    [S("Multi\nline\n\nsystem"), U("one"), A("two"), U("three"), A("four"), U("five")],
    [A("I speak first."), U("Then I answer.")],
    [U("before"), A("reply"), S("A system note in the middle."), U("after")],
    [U("only a user, then a system"), S("late system")],
    [S("only a system prompt")],
    [U("first user message"), U("second one, joined by Ollama"), A("ok")],
    [S("sys"), A("the assistant right after the system prompt")],
    [A("a lone assistant message")],
    [U("q"), A("a"), S("system after the assistant")],
    [S("Unicode: naïve café, 中文, emoji 🚀, Ελληνικά"),
     U("Go/Jinja look-alikes: {{ .Content }} {{- end }} {{/* c */}} {% endfor %} {# x #} }} {{"),
     A("Tokens as text: <|im_end|> <|eot_id|> <|end_of_text|> and \\ backslashes\\n"),
     U("CRLF line\r\nand a\ttab")],
]


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, data) -> str with Go's text/template, via render.go built once."""
    go = shutil.which("go") or ("/usr/lib/go/bin/go" if os.access("/usr/lib/go/bin/go", os.X_OK) else None)
    if go is None:
        pytest.fail("Go is missing: the Ollama template parity tests render with Go's text/template. "
                    "`make setup` installs golang-go (or: sudo apt-get install golang-go).")
    out = tmp_path_factory.mktemp("go-render")
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": ""}
    if not os.access(Path.home(), os.W_OK):  # Go's default cache and module folders live in HOME
        env.update(GOCACHE=str(out / "cache"), GOPATH=str(out / "gopath"))
    binary = out / "render"
    built = subprocess.run([go, "build", "-o", str(binary), str(RENDER_GO)], env=env, capture_output=True, text=True)
    assert built.returncode == 0, f"go build {RENDER_GO} failed:\n{built.stderr}"

    def render(template: str, data: dict) -> str:
        request = json.dumps({"template": template, "data": data})
        run = subprocess.run([str(binary)], input=request.encode(), capture_output=True)
        assert run.returncode == 0, f"Go's text/template refused the template: {run.stderr.decode()}"
        return run.stdout.decode()

    return render


@pytest.fixture(scope="session")
def templates_dir() -> Path:
    d = llamacpp.converter_dir() / "models" / "templates"
    if not d.is_dir():  # a cache extracted before models/templates was part of it
        llamacpp.fetch_converter()
    assert d.is_dir(), f"{d} is missing after `python -m pipeline.llamacpp fetch`"
    return d


@pytest.fixture(scope="session")
def smollm2(smollm2_tokenizer_dir) -> tuple[str, dict, set[str]]:
    """SmolLM2's chat template, bos/eos texts and special-token texts, as its tokenizer folder holds them."""
    config = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    jinja_file = smollm2_tokenizer_dir / "chat_template.jinja"  # transformers 5; before, in the config
    jinja = jinja_file.read_text() if jinja_file.is_file() else config["chat_template"]
    text = lambda t: t["content"] if isinstance(t, dict) else t  # noqa: E731
    tokens = {k: text(config[k]) for k in ("bos_token", "eos_token")}
    added = json.loads((smollm2_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    specials = {t["content"] for t in added if t["special"]}
    return jinja, tokens, specials


@pytest.fixture(scope="session")
def case(templates_dir, smollm2):
    """(jinja template, special tokens, add_bos, to_ollama's result) of CASES[name], translated once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            file, tokens, add_bos = CASES[name]
            jinja, tokens = smollm2[:2] if file is None else ((templates_dir / file).read_text(), tokens)
            cache[name] = (jinja, tokens, add_bos, to_ollama(jinja, tokens, add_bos))
        return cache[name]

    return get


# --- helpers --------------------------------------------------------------------------------------

def jinja_prompt(jinja: str, tokens: dict, add_bos: bool, messages: list[dict]) -> str:
    """The Jinja rendering of what Ollama's template sees, minus the BOS the runtime adds."""
    seen = [{"role": m["Role"], "content": m["Content"]} for m in ollama_data(messages)["Messages"]]
    out = render_chat(jinja, seen, tokens, add_generation_prompt=seen[-1]["role"] != "assistant")
    return out[len(tokens["bos_token"]):] if add_bos and out.startswith(tokens["bos_token"]) else out


def parity_failures(jinja, tokens, add_bos, go_template, go_render, conversations=CONVERSATIONS, first_only=False):
    failures = []
    for messages in conversations:
        expected = jinja_prompt(jinja, tokens, add_bos, messages)
        got = go_render(go_template, ollama_data(messages))
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            failures.append(f"{[m['role'] for m in messages]}: at {at}, Jinja {expected[at:at + 40]!r}, "
                            f"Go {got[at:at + 40]!r}")
            if first_only:
                break
    return failures


def literal_texts(go_template: str) -> list[re.Match]:
    """The raw texts the template prints: those between `}}` and an untrimmed `{{ `."""
    return list(re.finditer(r"(?<=\}\})((?:(?!\{\{).)+)(?=\{\{ )", go_template, re.S))


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_go_renders_what_jinja_renders(name, case, go_render):
    jinja, tokens, add_bos, result = case(name)
    assert parity_failures(jinja, tokens, add_bos, result.template, go_render) == []


@pytest.mark.parametrize("name", CASES)
def test_changing_any_text_of_the_template_is_caught(name, case, go_render):
    jinja, tokens, add_bos, result = case(name)
    texts = literal_texts(result.template)
    assert len(texts) >= 9, result.template  # 3 first-message texts, 6 role pairs, the ends
    for m in texts:
        mutated = result.template[:m.start()] + "\u2022" + result.template[m.start():]
        assert parity_failures(jinja, tokens, add_bos, mutated, go_render, first_only=True), \
            f"no conversation renders the text {m.group()!r}: a change there goes unnoticed"


def test_warnings_name_what_ollama_renders_differently(case):
    today = datetime.now()
    assert case("smollm2")[3].warnings == []
    for name in ("llama-3.1", "llama-3.2"):
        assert any("whitespace" in w and "|trim" in w for w in case(name)[3].warnings), name
    for name, date in (("llama-3.2", today.strftime("%d %b %Y")), ("granite-3.3", today.strftime("%B %d, %Y"))):
        result = case(name)[3]
        assert any("today's date" in w and date in w for w in result.warnings), name
        assert date in result.template
    assert not any("date" in w for w in case("llama-3.1")[3].warnings)  # its date is fixed text
    assert any("empty system" in w for w in case("granite-4.0")[3].warnings)
    assert all(any("tools are not translated" in w for w in case(n)[3].warnings) for n in CASES if n != "smollm2")


def test_the_trim_warning_is_true(case, go_render):
    jinja, tokens, add_bos, result = case("llama-3.2")
    padded = [[U("  spaces around  \n")]]
    assert parity_failures(jinja, tokens, add_bos, result.template, go_render, padded)


def test_bos_is_left_to_the_runtime_only_when_it_adds_one(case, go_render):
    assert "<|begin_of_text|>" not in case("llama-3.1")[3].template
    no_add = case("llama-3.1-no-add-bos")[3].template
    assert go_render(no_add, ollama_data([U("hi")])).startswith("<|begin_of_text|><|start_header_id|>system")
    # A runtime BOS the Jinja template does not print is a warning, not a silent difference.
    result = to_ollama(case("smollm2")[0], {"bos_token": "<s>", "eos_token": "<|im_end|>"}, add_bos=True)
    assert any("one BOS more" in w for w in result.warnings)


def test_stops_end_the_assistant_turn(case, smollm2):
    assert case("smollm2")[3].stops == ["<|im_end|>"]
    jinja, tokens, specials = smollm2
    assert "<|im_end|>" in specials and to_ollama(jinja, tokens, False, special_texts=specials).stops == ["<|im_end|>"]
    assert case("llama-3.2")[3].stops == ["<|eot_id|>"]
    assert case("granite-4.0")[3].stops == ["<|end_of_text|>"]
    jinja = case("llama-3.1")[0]
    base_eos = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    assert to_ollama(jinja, base_eos, True).stops == ["<|eot_id|>", "<|end_of_text|>"]
    specials = {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"}
    assert to_ollama(jinja, LLAMA3, True, special_texts=specials).stops == ["<|eot_id|>"]


def test_go_delimiters_and_modelfile_quotes_in_literal_text(go_render):
    jinja = ("{% for m in messages %}{{ '{{' + m.role + '}} \"\"\"' }}{{ m.content }}{{ '\\x01\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '{{assistant}}' }}{% endif %}")
    tokens = {"bos_token": "", "eos_token": ""}
    result = to_ollama(jinja, tokens, add_bos=False)
    assert '"""' not in result.template  # the Modelfile writes TEMPLATE """..."""
    assert parity_failures(jinja, tokens, False, result.template, go_render) == []


@pytest.mark.parametrize("jinja, why", [
    ("{% for m in messages|reverse %}<{{ m.role }}>{{ m.content }}\n{% endfor %}", "once, in order"),
    ("{% for m in messages %}[{{ loop.index }}] {{ m.role }}: {{ m.content }}\n{% endfor %}",
     "depends on more than the roles"),
    ("{% for m in messages %}<{{ m.role }}>{{ m.content|upper }}\n{% endfor %}", "once, in order"),
    ("{% for m in messages %}<{{ m.role }}{% if m.content|length > 20 %} long{% endif %}>{{ m.content }}{% endfor %}",
     "renders conversation"),
    ("{{ messages[0].content }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", "once, in order"),
])
def test_untranslatable_templates_raise_a_clear_error(jinja, why):
    with pytest.raises(TemplateNotTranslatable, match=re.escape(why)) as e:
        to_ollama(jinja, {"bos_token": "", "eos_token": ""}, add_bos=False)
    assert isinstance(e.value, PipelineError) and "conversation" in str(e.value)


def test_a_template_that_moves_later_system_messages_translates_without_them(go_render):
    jinja = ("{% if messages[0].role == 'system' %}<sys>{{ messages[0].content }}</sys>{% endif %}"
             "{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokens = {"bos_token": "", "eos_token": ""}
    result = to_ollama(jinja, tokens, add_bos=False)
    assert any("a system message after the first message is not translated" in w for w in result.warnings)
    first_only = [c for c in CONVERSATIONS if all(m["role"] != "system" for m in c[1:])]
    assert len(first_only) >= 10
    assert parity_failures(jinja, tokens, False, result.template, go_render, first_only) == []


def test_refused_conversations_are_a_warning(go_render):
    jinja = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokens = {"bos_token": "", "eos_token": ""}
    result = to_ollama(jinja, tokens, add_bos=False)
    assert any("no system role" in w and "start->system" in w for w in result.warnings)
    no_system = [c for c in CONVERSATIONS if all(m["role"] != "system" for m in c)]
    assert parity_failures(jinja, tokens, False, result.template, go_render, no_system) == []


def test_ollama_data_collates_like_ollama():
    data = ollama_data([S("s"), U("a"), U("b"), A("c"), A("d")])
    assert data == {"Messages": [{"Role": "system", "Content": "s"}, {"Role": "user", "Content": "a\n\nb"},
                                 {"Role": "assistant", "Content": "c\n\nd"}]}
