"""train.mask: which tokens of a row are trained (pipeline/data/trained_tokens.py), checked by decoding.

Each chat template family runs on a copy of the SmolLM2 tokenizer with that family's special tokens
added (single tokens, as in the real models): ChatML (SmolLM2's own template) and the real Llama 3.2,
Granite 3.3 and Granite 4.0 templates from llama.cpp's source tree. The expected assistant turns are
written out by hand below, not derived from the code under test.
"""

from __future__ import annotations

import json

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

from pipeline.data.trained_tokens import Encoded, assign_tokens, encode_row, encode_rows
from pipeline.errors import DataError

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

FAMILIES = {
    # name: (llama.cpp template file or None for the tokenizer's own, special tokens, bos, eos, tool style)
    "chatml": (None, [], None, None, "content"),
    "llama3": ("meta-llama-Llama-3.2-3B-Instruct.jinja",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "tool_calls"),
    "granite3": ("ibm-granite-granite-3.3-2B-Instruct.jinja",
                 ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"],
                 None, "<|end_of_text|>", "content"),
    "granite4": ("ibm-granite-granite-4.0.jinja",
                 ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"],
                 None, "<|end_of_text|>", "tool_calls"),
}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "granite3": "<|end_of_text|>", "granite4": "<|end_of_text|>"}
# The tool call as each template prints it for the assistant (content style: written in the content).
CALL_TEXT = {
    "chatml": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "granite3": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "granite4": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
}
ANSWERS = ["2 + 2 is 4.", "It is 18 degrees in Paris.", "You're welcome!"]


def conversation(family: str) -> dict:
    """System, three answered questions, one of them through a tool round."""
    style = FAMILIES[family][4]
    call = ({"role": "assistant", "content": "", "tool_calls": [CALL]} if style == "tool_calls"
            else {"role": "assistant", "content": CALL_TEXT[family]})
    row = {"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "And the weather in Paris?"},
        call,
        {"role": "tool", "content": '{"temperature": 18}'},
        {"role": "assistant", "content": ANSWERS[1]},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": ANSWERS[2]},
    ]}
    if family in ("llama3", "granite3", "granite4"):
        row["tools"] = [WEATHER_TOOL]
    return row


def expected_turns(family: str) -> list[str]:
    end = END[family]
    return [ANSWERS[0] + end, CALL_TEXT[family] + end, ANSWERS[1] + end, ANSWERS[2] + end]


@pytest.fixture(scope="module")
def templates_dir():
    from pipeline.llamacpp import require_converter

    return require_converter() / "models" / "templates"


def family_tokenizer(tokenizer_dir, templates_dir, family: str):
    from transformers import AutoTokenizer

    template, specials, bos, eos, _ = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if template:
        tok.chat_template = (templates_dir / template).read_text()
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    return tok


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir, templates_dir):
    return {f: family_tokenizer(smollm2_tokenizer_dir, templates_dir, f) for f in FAMILIES}


def trained_spans(tok, enc: Encoded) -> list[str]:
    """The decoded trained tokens, grouped into contiguous runs."""
    runs, current = [], []
    for token, m in zip(enc.ids, enc.mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def template_ids(tok, row) -> list[int]:
    from pipeline.data.formats import to_messages

    out = tok.apply_chat_template(to_messages(row), tools=row.get("tools"), return_dict=False)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_assistant_turn_is_trained_and_nothing_else(tokenizers, family):
    tok, row = tokenizers[family], conversation(family)
    enc = encode_row(row, tok, "assistant")
    assert enc.ids == template_ids(tok, row) and len(enc.mask) == len(enc.ids)
    assert trained_spans(tok, enc) == expected_turns(family)
    # the untrained tokens hold every other message (the user questions and the tool result among them)
    untrained = tok.decode([t for t, m in zip(enc.ids, enc.mask) if not m])
    for text in ("You answer briefly.", "What is 2 + 2?", "And the weather in Paris?", "temperature", "Thanks."):
        assert text in untrained
    assert untrained.count("assistant") >= 4  # the four role headers stay untrained


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrapper_and_plain_tokenizer_agree(tokenizers, family):
    tok, row = tokenizers[family], conversation(family)
    for mode in ("assistant", "last", "none"):
        assert encode_row(row, TokenizerWrapper(tok), mode) == encode_row(row, tok, mode)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_last_is_mlx_lm_mask_prompt(tokenizers, family):
    tok, row = TokenizerWrapper(tokenizers[family]), conversation(family)
    tokens, offset = ChatDataset([row], tok, mask_prompt=True).process(row)
    enc = encode_row(row, tok, "last")
    assert enc.ids == list(tokens) and enc.mask == [0] * offset + [1] * (len(tokens) - offset)
    trained = trained_spans(tokenizers[family], enc)
    assert len(trained) == 1 and ANSWERS[2] + END[family] in trained[0] and "Thanks" not in trained[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_none_trains_every_token(tokenizers, family):
    tok, row = tokenizers[family], conversation(family)
    enc = encode_row(row, tok, "none")
    tokens, offset = ChatDataset([row], TokenizerWrapper(tok), mask_prompt=False).process(row)
    assert enc.ids == list(tokens) and offset == 0 and enc.mask == [1] * len(tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_completions_train_the_completion(tokenizers, family):
    tok = tokenizers[family]
    row = {"prompt": "Capital of France?", "completion": "Paris."}
    wrapped = TokenizerWrapper(tok)
    tokens, offset = CompletionsDataset([row], wrapped, "prompt", "completion", mask_prompt=True).process(row)
    last = encode_row(row, wrapped, "last")
    assert last.ids == list(tokens) and last.mask == [0] * offset + [1] * (len(tokens) - offset)
    assistant = encode_row(row, tok, "assistant")
    assert assistant.ids == list(tokens) and trained_spans(tok, assistant) == ["Paris." + END[family]]
    assert encode_row(row, tok, "none").mask == [1] * len(tokens)


@pytest.mark.parametrize("mode", ["assistant", "last", "none"])
def test_text_trains_every_token_with_eos(tokenizers, mode):
    tok = tokenizers["llama3"]
    wrapped = TokenizerWrapper(tok)
    for text in ("Plain text to continue.", "Already ends with eos<|eot_id|>"):
        row = {"text": text}
        tokens, _ = TextDataset([row], wrapped).process(row)
        enc = encode_row(row, wrapped, mode)
        assert enc.ids == tokens and enc.mask == [1] * len(tokens)
        assert enc.ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and enc.ids[-2] != enc.ids[-1]


def test_last_loses_the_earlier_turns(tokenizers):
    """The figure train.mask: assistant is for: on a 2-turn chat, `last` trains only the second answer."""
    tok = tokenizers["chatml"]
    row = {"messages": [{"role": "user", "content": "Name a colour."},
                        {"role": "assistant", "content": "Blue is a calm colour."},
                        {"role": "user", "content": "Another one?"},
                        {"role": "assistant", "content": "Green."}]}
    assistant, last = encode_row(row, tok, "assistant"), encode_row(row, tok, "last")
    first = len(tok.encode("Blue is a calm colour.<|im_end|>", add_special_tokens=False))
    second = len(tok.encode("Green.<|im_end|>", add_special_tokens=False))
    assert (assistant.trained, last.trained) == (first + second, second + 1)  # mlx-lm also trains the "\n"
    assert trained_spans(tok, last) == ["Green.<|im_end|>\n"]


def test_encode_rows_matches_encode_row(tokenizers):
    tok = tokenizers["granite4"]
    rows = [conversation("granite4"), {"prompt": "p?", "completion": "c."}, conversation("granite4")]
    assert encode_rows(rows, tok, "assistant") == [encode_row(r, tok, "assistant") for r in rows]


REWRITING = (  # drops the content of every assistant turn but the last: earlier turns change later
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}[answered]{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TWO_TURNS = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "first"},
                          {"role": "user", "content": "b?"}, {"role": "assistant", "content": "second"}]}


@pytest.fixture
def chatml(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))


def test_template_rewriting_earlier_turns_is_refused(chatml):
    chatml.chat_template = REWRITING
    with pytest.raises(DataError, match="row 2: .*not prefix-consistent.*train.mask: last"):
        encode_rows([{"prompt": "p", "completion": "c"}, TWO_TURNS], chatml, "assistant")
    with pytest.raises(DataError, match=r'row \{"messages".*train.mask: last'):
        encode_row(TWO_TURNS, chatml, "assistant")
    # one turn is fine, and so are the other modes
    assert trained_spans(chatml, encode_row({"prompt": "p", "completion": "c"}, chatml, "assistant")) == ["c<|im_end|>"]
    assert sum(encode_row(TWO_TURNS, chatml, "last").mask) > 0
    assert all(encode_row(TWO_TURNS, chatml, "none").mask)


def test_generation_marks_are_used_when_the_template_rewrites(chatml):
    chatml.chat_template = REWRITING.replace(
        "{% else %}{{ m.content }}{% endif %}<|im_end|>",
        "{% elif m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }}<|im_end|>{% endif %}").replace("[answered]", "[answered]<|im_end|>")
    enc = encode_row(TWO_TURNS, chatml, "assistant")
    assert enc.ids == template_ids(chatml, TWO_TURNS)
    assert trained_spans(chatml, enc) == ["second<|im_end|>"]  # the rewritten turn has no generation mark


def test_straddling_token_belongs_to_the_region_of_its_first_character():
    # tokens [0,3) [3,6) [6,9) [9,12); span [4,10): token 1 starts before it (prompt), token 3 inside it
    mask, per_span = assign_tokens([(0, 3), (3, 6), (6, 9), (9, 12)], [(4, 10)])
    assert mask == [0, 0, 1, 1] and per_span == [2]
    mask, per_span = assign_tokens([(0, 3), (3, 6), (6, 9)], [(1, 2), (6, 9)])
    assert mask == [0, 0, 1] and per_span == [0, 1]


def test_a_turn_inside_a_prompt_token_is_an_error_not_silence(chatml):
    """A generation prompt ending mid-word: the token spanning prompt and answer is not trained; when
    it swallows the whole answer, the row is refused."""
    chatml.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n{% else %}Ok{{ m.content }}"
        "{% if not loop.last %}\n{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}Ok{% endif %}")
    assert chatml.tokenize("Okay", add_special_tokens=False) == ["Okay"]  # one token, starting in the prompt
    row = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ay, fine"}]}
    assert trained_spans(chatml, encode_row(row, chatml, "assistant")) == [", fine"]
    with pytest.raises(DataError, match="no token of its own.*train.mask: last"):
        encode_row({"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ay"}]},
                   chatml, "assistant")


def test_unknown_mode_is_refused(chatml):
    with pytest.raises(ValueError, match="assistant, last, none"):
        encode_row({"text": "x"}, chatml, "all")


def test_rows_are_json_rows():
    json.dumps(conversation("llama3"))  # the test data is what a JSONL file holds


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_trainers_batch_computes_loss_on_exactly_the_assistant_turns(tokenizers, family):
    """What 04's loss sees: collate's targets (tokens shifted by one) where its mask is 1."""
    import numpy as np

    from pipeline.batching import collate

    tok, row = tokenizers[family], conversation(family)
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    encoded = encode_rows([row, short], tok, "assistant")
    batch = collate(encoded, [0, 1], max_length=4096)
    targets, mask = np.array(batch.tokens)[:, 1:], np.array(batch.mask)
    assert mask.shape == targets.shape and mask[1, len(encoded[1].ids) - 1:].sum() == 0  # padding untrained
    got = trained_spans(tok, Encoded(list(targets[0]), [int(m) for m in mask[0]]))
    assert got == expected_turns(family)
    assert trained_spans(tok, Encoded(list(targets[1]), [int(m) for m in mask[1]])) == ["Hello." + END[family]]
