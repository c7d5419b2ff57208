"""Which tokens of one training row the loss counts on (`train.mask`).

    encode_row(row, tokenizer, mode) -> Encoded(ids, mask)

`ids` are the row's tokens exactly as mlx-lm makes them: the chat template's tokens
(`apply_chat_template(messages, tools=...)`) for chat and completions rows, `encode(text)` plus the
end-of-sequence token when missing for text rows. `mask[i]` is 1 where `ids[i]` is a trained target.

Modes (chat and completions rows; text rows train every token in every mode):
  assistant  every assistant message: the tokens its template emits after the generation prompt
             (content, tool calls and the end-of-turn token such as <|im_end|>, <|eot_id|>,
             <|end_of_text|>); not the role header, not the whitespace after the end-of-turn token,
             not the system, user or tool messages. A completions row is the chat [user: prompt,
             assistant: completion].
  last       mlx-lm's mask_prompt: everything from offset = len(template(messages[:-1], generation
             prompt)) to the end.
  none       every token.

How the assistant turns are found: from the template itself. For assistant message i, the render of
messages[:i] with the generation prompt and the render of messages[:i+1] must both be prefixes of the
full render; the characters between them (less trailing whitespace) are the turn. The full render is
tokenized with character offsets (its ids must equal apply_chat_template's) and a token belongs to
the region holding its FIRST character: a token straddling the start of a turn (prompt text + answer
text) is not trained, one straddling its end (answer text + what follows) is. A turn left without a
token of its own is an error, never a silently untrained answer. A template that renders earlier
turns differently once later messages follow (not prefix-consistent) is read through its
`{% generation %}` marks (transformers' assistant mask) when it has them; otherwise the row is refused
with a DataError that says to use `train.mask: last` or `none`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import DataError
from .formats import detect_format, to_messages

MODES = ("assistant", "last", "none")
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
FALLBACK_HINT = ("Set train.mask: last (train only the final answer, as mlx-lm's mask_prompt) or "
                 "train.mask: none (train every token).")


@dataclass
class Encoded:
    ids: list[int]  # the row's tokens, exactly what the chat template gives (text rows: encode + eos)
    mask: list[int]  # same length; 1 where ids[i] is a trained target (its loss counts), else 0

    @property
    def trained(self) -> int:
        return sum(self.mask)

    @property
    def masked(self) -> int:
        return len(self.mask) - sum(self.mask)


def encode_row(row: dict, tokenizer, mode: str) -> Encoded:
    """One JSONL row's tokens and trained mask (see the module docstring)."""
    return RowEncoder(tokenizer, mode).encode(row, where=f"row {_excerpt(row)}")


def encode_rows(rows: list[dict], tokenizer, mode: str) -> list[Encoded]:
    """encode_row for every row, with the tokenizer checks done once; errors name the row by number."""
    enc = RowEncoder(tokenizer, mode)
    return [enc.encode(row, where=f"row {i + 1}") for i, row in enumerate(rows)]


def assign_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(mask, tokens per span): token k is trained when its first character offsets[k][0] lies in a span
    [start, end). A token straddling a span's start is therefore not trained; one straddling its end is."""
    mask, per_span = [0] * len(offsets), [0] * len(spans)
    j = 0
    for k, (a, _) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and spans[j][0] <= a:
            mask[k] = 1
            per_span[j] += 1
    return mask, per_span


class RowEncoder:
    """Encodes rows for one tokenizer and mode; `where` names the row in errors ('file:line')."""

    def __init__(self, tokenizer, mode: str):
        if mode not in MODES:
            raise ValueError(f"train.mask must be one of {', '.join(MODES)}, got {mode!r}")
        self.tokenizer = tokenizer  # an mlx-lm TokenizerWrapper or a transformers tokenizer
        self.hf = _hf_tokenizer(tokenizer)
        self.mode = mode
        template = getattr(self.hf, "chat_template", None)
        templates = template.values() if isinstance(template, dict) else [template or ""]
        self.has_generation_marks = any(GENERATION_MARK.search(t) for t in templates)

    def encode(self, row: dict, where: str = "row") -> Encoded:
        fmt = detect_format(row)
        if fmt == "text":
            return self._text(row)
        if fmt is None:
            raise DataError(f"{where}: not a chat, completions or text row")
        messages, tools = to_messages(row), row.get("tools")
        ids = self._tokens(messages, tools)
        if self.mode == "none":
            return Encoded(ids, [1] * len(ids))
        if self.mode == "last":
            # mlx-lm: ChatDataset adds the generation prompt when the last message is the assistant's,
            # CompletionsDataset always.
            gen = fmt == "completions" or messages[-1].get("role") == "assistant"
            offset = min(len(self._tokens(messages[:-1], tools, add_generation_prompt=gen)), len(ids))
            return Encoded(ids, [0] * offset + [1] * (len(ids) - offset))
        return self._assistant(messages, tools, ids, where)

    # -- the three encodings --------------------------------------------------------------------

    def _text(self, row: dict) -> Encoded:
        ids = list(self.tokenizer.encode(row["text"]))
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):  # as mlx-lm's TextDataset
            ids.append(eos)
        return Encoded(ids, [1] * len(ids))

    def _assistant(self, messages: list[dict], tools, ids: list[int], where: str) -> Encoded:
        full = self._render(messages, tools)
        spans = self._spans(messages, tools, full)
        if spans is None:
            if self.has_generation_marks:
                return self._generation_marks(messages, tools, ids, where)
            raise DataError(
                f"{where}: the chat template renders earlier turns differently once later messages follow "
                "(it is not prefix-consistent) and has no {% generation %} marks, so its assistant turns "
                f"cannot be found for train.mask: assistant. {FALLBACK_HINT}")
        enc = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != ids:
            raise DataError(
                f"{where}: tokenizing the rendered chat gives other tokens than apply_chat_template, so the "
                f"assistant turns cannot be located in the tokens. {FALLBACK_HINT}")
        mask, per_span = assign_tokens([tuple(o) for o in enc["offset_mapping"]], spans)
        if empty := [n for n, count in enumerate(per_span, 1) if count == 0]:
            raise DataError(
                f"{where}: assistant turn {empty[0]} has no token of its own (a token that starts in the "
                f"prompt covers it), so it would not be trained. {FALLBACK_HINT}")
        return Encoded(ids, mask)

    def _generation_marks(self, messages, tools, ids, where) -> Encoded:
        out = self.hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        if list(out["input_ids"]) != ids:
            raise DataError(f"{where}: the template's {{% generation %}} marks give other tokens than "
                            f"apply_chat_template. {FALLBACK_HINT}")
        return Encoded(ids, [int(bool(m)) for m in out["assistant_masks"]])

    # -- template helpers -----------------------------------------------------------------------

    def _spans(self, messages: list[dict], tools, full: str) -> list[tuple[int, int]] | None:
        """Character ranges of the assistant turns in `full`, or None when the template is not
        prefix-consistent for this conversation."""
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            try:
                prompt = self._render(messages[:i], tools, add_generation_prompt=True)
                turn = self._render(messages[:i + 1], tools)
            except Exception:  # noqa: BLE001 - e.g. a template that cannot render a conversation's head
                return None
            if not (turn.startswith(prompt) and full.startswith(turn)):
                return None
            end = len(turn)
            while end > len(prompt) and turn[end - 1].isspace():
                end -= 1
            spans.append((len(prompt), end))
        return spans

    def _render(self, messages, tools, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _tokens(self, messages, tools, add_generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 return_dict=False)
        if hasattr(out, "keys"):  # a BatchEncoding, whatever return_dict said
            out = out["input_ids"]
        return list(out)


def _hf_tokenizer(tokenizer):
    """The transformers tokenizer: mlx-lm's TokenizerWrapper keeps it as `_tokenizer` (a transformers fast
    tokenizer's own `_tokenizer` is the Rust one, which has no apply_chat_template)."""
    inner = tokenizer.__dict__.get("_tokenizer")
    return inner if inner is not None and hasattr(inner, "apply_chat_template") else tokenizer


def _excerpt(row: dict, width: int = 80) -> str:
    text = json.dumps(row, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."
