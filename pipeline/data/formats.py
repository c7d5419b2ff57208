"""The three JSONL row formats mlx-lm trains on, and their validation.

    chat:        {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    completions: {"prompt": "...", "completion": "..."}
    text:        {"text": "..."}

A file's format is the format of its first valid row; every other row must have the same one
(mlx-lm picks the dataset class from the first row and would fail mid-training otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("chat", "completions", "text")
ROLES = ("system", "user", "assistant", "tool")
MISSING_KEYS = "missing 'messages' (chat), 'prompt'+'completion' (completions) or 'text'"


def detect_format(row: dict) -> str | None:
    """The format a row claims by its keys, in mlx-lm's order of precedence."""
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


def check_row(row) -> tuple[str | None, str | None]:
    """(format, None) for a valid row, (format or None, reason) for an invalid one."""
    if not isinstance(row, dict):
        return None, "row is not a JSON object"
    fmt = detect_format(row)
    if fmt is None:
        if "prompt" in row or "completion" in row:
            return None, "completions rows need both 'prompt' and 'completion'"
        return None, MISSING_KEYS
    if fmt == "completions":
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str):
                return fmt, f"'{key}' must be a string, got {type(row[key]).__name__}"
        return fmt, None
    if fmt == "text":
        if not isinstance(row["text"], str) or not row["text"].strip():
            return fmt, "'text' must be a non-empty string"
        return fmt, None
    return fmt, _check_messages(row["messages"])


def _check_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}].role {role!r} not one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
    if messages[-1]["role"] != "assistant":
        # mlx-lm masks the prompt as everything before the last message: it must be the answer.
        return f"the last message must be from the assistant, got '{messages[-1]['role']}'"
    return None


def read_rows(path: str | Path) -> tuple[list[tuple[int, dict]], list[str], str | None]:
    """([(line number, row)], errors as 'path:line: reason', the file's format)."""
    rows, errors, file_fmt = [], [], None
    with open(path, "rb") as f:  # bytes: one bad line is reported, not a crash of the whole read
        for lineno, raw in enumerate(f, 1):
            try:  # utf-8-sig on line 1: editors on Windows start UTF-8 files with a byte-order mark
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{lineno}: not valid JSON ({e})")
                continue
            except RecursionError:
                errors.append(f"{path}:{lineno}: JSON nested too deeply")
                continue
            fmt, reason = check_row(row)
            if reason is None and file_fmt is not None and fmt != file_fmt:
                reason = f"format '{fmt}' differs from the file's format '{file_fmt}'"
            if reason is not None:
                errors.append(f"{path}:{lineno}: {reason}")
                continue
            file_fmt = file_fmt or fmt
            rows.append((lineno, row))
    return rows, errors, file_fmt


def read_jsonl(path: str | Path) -> tuple[list[dict], list[str]]:
    """(valid rows, errors as 'path:line: reason'); blank lines are skipped."""
    rows, errors, _ = read_rows(path)
    return [r for _, r in rows], errors


def to_messages(row: dict) -> list[dict]:
    """A chat or completions row as chat messages (completions: one user/assistant turn, as mlx-lm)."""
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if "messages" in row:
        return row["messages"]
    raise ValueError("text rows have no prompt and answer")


def prompt_and_answer(row: dict) -> tuple[list[dict], str]:
    """(messages before the answer, the answer) of a chat or completions row."""
    messages = to_messages(row)
    return messages[:-1], messages[-1]["content"]
