"""An importance matrix from the user's own training data, for llama.cpp's quantizer.

The training split is rendered through the trained model's chat template (what the model will
see in LM Studio), llama.cpp's `llama-imatrix` runs the unquantized GGUF over it and records,
per weight column, the mean squared activation; `llama-quantize --imatrix` then spends its
rounding error where the activations are small. Both tools come from the pinned llama.cpp
commit (pipeline/llamacpp.py builds them).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import click

from . import llamacpp
from .data.formats import to_messages
from .errors import DataError, PipelineError
from .fsio import atomic_path, write_text

# llama-imatrix prints "[12]7.3470," (chunk, perplexity so far) after each chunk, without a newline.
_DONE = re.compile(r"\[(\d+)\](\d+\.\d+),")


def calibration_text(data_dir: Path, tokenizer_dir: Path, out: Path) -> dict:
    """Render data/train.jsonl through the chat template into one text file; returns its stats."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{data_dir / 'train.jsonl'} is empty: the importance matrix needs training rows.")
    if tokenizer.chat_template and "text" not in rows[0]:
        texts = [tokenizer.apply_chat_template(to_messages(r), tools=r.get("tools"), tokenize=False) for r in rows]
    else:
        texts = [r["text"] if "text" in r else "\n".join(m["content"] for m in to_messages(r)) for r in rows]
    text = "\n".join(texts)
    write_text(out, text)
    return {"rows": len(rows), "tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])}


def compute_imatrix(model_gguf: Path, text_file: Path, out: Path, tokens: int, chunk_tokens: int,
                    max_chunks: int, threads: int = 0) -> dict:
    """Run llama-imatrix over the calibration text; writes `out` (GGUF imatrix) atomically."""
    if tokens < 2 * chunk_tokens:
        raise DataError(
            f"The training split renders to {tokens} tokens; llama-imatrix needs at least {2 * chunk_tokens} "
            f"(two chunks of gguf.imatrix_chunk_tokens = {chunk_tokens}). Lower --imatrix-chunk-tokens or add data."
        )
    binary = llamacpp.tool("llama-imatrix")
    chunks = min(max_chunks, tokens // chunk_tokens) if max_chunks > 0 else tokens // chunk_tokens
    t0 = time.time()
    with atomic_path(out) as tmp:  # a `.tmp` name: the format is asked for, not inferred from the suffix
        cmd = [str(binary), "-m", str(model_gguf), "-f", str(text_file), "-o", str(tmp), "--output-format", "gguf",
               "-c", str(chunk_tokens), "-b", str(chunk_tokens), "--chunks", str(chunks), "--parse-special",
               "-ofreq", str(10 ** 6)] + (["-t", str(threads)] if threads else [])
        log = _run_with_progress(cmd, chunks, model_gguf)
        if not tmp.is_file():
            raise PipelineError(f"llama-imatrix wrote no file:\n{llamacpp.log_tail([log])}")
    ppl = _DONE.findall(log)
    return {"chunks": chunks, "chunk_tokens": chunk_tokens, "tokens_used": chunks * chunk_tokens,
            "perplexity": float(ppl[-1][1]) if ppl else None, "seconds": round(time.time() - t0, 1)}


def _run_with_progress(cmd: list[str], chunks: int, model_gguf: Path) -> str:
    from tqdm import tqdm

    text = ""
    bar = tqdm(total=chunks, desc="imatrix", unit="chunk", dynamic_ncols=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=llamacpp.child_env())
    while block := proc.stdout.read1(4096):  # chunk results come without newlines: read what is there
        text += block.decode("utf-8", "replace")
        seen = _DONE.findall(text[-4096:])
        if seen:
            bar.n = min(int(seen[-1][0]), chunks)
            bar.set_postfix(ppl=seen[-1][1], refresh=False)
            bar.refresh()
    bar.close()
    if proc.wait() != 0:
        raise llamacpp.child_error(f"computing the importance matrix of {model_gguf}", proc.returncode, text)
    return text


def quantize_with_imatrix(src: Path, dst: Path, type_name: str, imatrix: Path, threads: int = 0) -> None:
    """llama-quantize --imatrix: the same quantizer as gguf.quantizations, guided by the matrix."""
    cmd = [str(llamacpp.tool("llama-quantize")), "--imatrix", str(imatrix), str(src), str(dst), type_name.upper()]
    output = llamacpp.run_child(cmd + ([str(threads)] if threads else []),
                                f"quantizing {src} to {type_name} with the importance matrix")
    if "imatrix" not in output.lower():
        click.secho(f"warning: llama-quantize did not report loading {imatrix.name}", fg="yellow")
