"""How closely one model agrees with another on the same conversations: the one measurement that
10 verify, the LoRA GGUF pair and fusion survival share.

- Conversations come from a split's chat rows (`read_rows`), each tokenized by the reference
  model's tokenizer through its chat template (`conversations`): the whole conversation, plus where
  its answer starts (the context rule: the answer's tokens are those after the prompt rendered with
  the generation prompt, when the full conversation starts with it; else every token).
- A scorer maps a conversation to log-probabilities (float64, `log_softmax`) at the positions of a
  span: "all" (every position) or "answer" (the positions that predict the answer's tokens). MLX
  models (`mlx_scorer`) and llama.cpp models (`gguf_scorer`) are scored the same way; both also
  score many conversations at once (`scores`: padded MLX batches, llama.cpp groups of sequences
  in one decode, pipeline/gguf_batch.py).
- `reference_scores` keeps a reference's log-probabilities (float32, one array per conversation)
  for comparing it with several candidates: computed once, not once per candidate.
- `compare(reference, candidate, convs, span)` is the one definition of the distance: mean over
  positions of KL(reference || candidate), top-1 agreement, and the candidate's perplexity of the
  conversation's own next tokens.
- Greedy answers for the task metric: `mlx_answers` (batched mlx-lm generation) and `gguf_answers`
  (argmax of llama.cpp's logits, rendered with the GGUF's own chat template, all prompts decoded
  together with their own KV streams).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.formats import prompt_and_answer
from .errors import DataError, MissingInputError, PipelineError

SPANS = ("all", "answer")
GEN_BATCH = 16


# --------------------------------------------------------------------------------------------
# Conversations


def read_rows(path: Path, n: int | None = None, required: bool = True) -> list[dict]:
    """The chat / completions rows of a JSONL split (the first `n`). `required`: a missing file or
    one without such rows is an error naming the fix; otherwise it gives []."""
    path = Path(path)
    if not path.is_file():
        if not required:
            return []
        raise MissingInputError(f"{path} not found. Run `make data` (or `mlx-pipeline data`) first.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    rows = [r for r in rows if "messages" in r or "prompt" in r]
    if not rows and required:
        raise DataError(f"{path} has no chat or completions rows: models are compared on chat conversations.")
    return rows[:n] if n is not None else rows


def full_conversation(row: dict) -> list[dict]:
    messages, answer = prompt_and_answer(row)
    return messages + [{"role": "assistant", "content": answer}]


@dataclass(frozen=True)
class Conversation:
    ids: list[int]  # the whole conversation through the chat template
    answer_start: int  # first position whose next token belongs to the answer

    def positions(self, span: str) -> slice:
        if span == "all":
            return slice(0, len(self.ids))
        if span == "answer":
            return slice(self.answer_start, len(self.ids) - 1)
        raise PipelineError(f"span must be one of {', '.join(SPANS)}, not {span!r}.")

    def targets(self, span: str) -> np.ndarray:
        """The next token of each position of the span that has one."""
        s = self.positions(span)
        return np.asarray(self.ids[s.start + 1: min(s.stop, len(self.ids) - 1) + 1])


def conversations(tokenizer, rows: list[dict]) -> list[Conversation]:
    out = []
    for r in rows:
        messages, _ = prompt_and_answer(r)
        full = list(tokenizer.apply_chat_template(full_conversation(r), tokenize=True, return_dict=False))
        prompt = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                    add_generation_prompt=True))
        start = max(len(prompt) - 1, 0) if full[: len(prompt)] == prompt else 0
        out.append(Conversation(full, start))
    return out


# --------------------------------------------------------------------------------------------
# Log-probabilities

Scorer = Callable[[Conversation, str], np.ndarray]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


MLX_BATCH = 8  # conversations per MLX forward (right-padded: a causal model's earlier positions ignore the pad)
MLX_LOGITS = 64 * 2**20  # float32 logits of one MLX forward at most (256 MB)


class _BatchScorer:
    """A Scorer that also scores many conversations at once: `many(convs, span)` yields each one's
    log-probabilities in order (what `scores` and `compare` use), from `logits(convs, span)`."""

    def __call__(self, conv: Conversation, span: str) -> np.ndarray:
        return next(iter(self.many([conv], span)))

    def many(self, convs: Sequence[Conversation], span: str) -> Iterator[np.ndarray]:
        return (log_softmax(x) for x in self.logits(convs, span))

    def logits(self, convs: Sequence[Conversation], span: str) -> Iterator[np.ndarray]:
        raise NotImplementedError


class _MlxScorer(_BatchScorer):
    def __init__(self, model):
        self.model = model

    def logits(self, convs, span):
        import mlx.core as mx

        vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
        i = 0
        while i < len(convs):
            # As many rows as keep the batch's logits within MLX_LOGITS floats (one row at least).
            width = max(len(c.ids) for c in convs[i: i + MLX_BATCH])
            rows = max(1, min(MLX_BATCH, MLX_LOGITS // (width * vocab))) if vocab else 1
            chunk, i = convs[i: i + rows], i + rows
            width = max(len(c.ids) for c in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int32)
            for row, c in enumerate(chunk):
                ids[row, : len(c.ids)] = c.ids
            logits = self.model(mx.array(ids)).astype(mx.float32)
            mx.eval(logits)
            batch = np.asarray(logits)  # MLX's buffer, not a copy: a row's logits are views of it
            for row, c in enumerate(chunk):
                yield batch[row, c.positions(span)]
            del logits, batch


class _GgufScorer(_BatchScorer):
    def __init__(self, llm):
        self.llm = llm

    def logits(self, convs, span):
        from . import gguf_batch

        spans = [_bounds(c, span) for c in convs]
        return gguf_batch.logits(self.llm, [c.ids for c in convs], spans)  # views: many() reads each at once


def _bounds(conv: Conversation, span: str) -> tuple[int, int]:
    s = conv.positions(span)
    return max(s.start, 0), max(min(s.stop, len(conv.ids)), s.start)


def mlx_scorer(model) -> Scorer:
    """An MLX model's log-probabilities (float32 logits of whole conversations, MLX_BATCH per forward)."""
    return _MlxScorer(model)


def gguf_scorer(llm) -> Scorer:
    """A llama.cpp model's log-probabilities (a context of its own: the `llm` may be opened without
    logits_all)."""
    return _GgufScorer(llm)


def scores(scorer: Scorer, convs: Sequence[Conversation], span: str) -> Iterator[np.ndarray]:
    """Each conversation's log-probabilities, in order, batched when the scorer can."""
    if hasattr(scorer, "many"):
        return iter(scorer.many(convs, span))
    return (scorer(c, span) for c in convs)


def cached(scorer: Scorer, convs: Sequence[Conversation], span: str) -> Scorer:
    """A scorer computed once per conversation (for a reference compared with several candidates;
    spans x vocabulary floats each, so keep the conversations few or the span short)."""
    memo = {id(c): p for c, p in zip(convs, scores(scorer, convs, span))}
    return lambda conv, s: memo[id(conv)] if s == span else scorer(conv, s)


class ReferenceScores(_BatchScorer):
    """A reference's log-probabilities at one span of the conversations, computed once: its float32
    logits as the model gave them and each position's log-normaliser (float64), from which
    `log_softmax` is recomputed exactly. `nbytes` is what they hold: positions x vocabulary x 4
    bytes (the demo's 24 test chats: 1,857 x 49,152 x 4 = 365 MB)."""

    def __init__(self, scorer: Scorer, convs: Sequence[Conversation], span: str):
        self.span = span
        self.scorer = scorer
        if hasattr(scorer, "logits"):
            kept = ((np.array(x, dtype=np.float32), _log_normaliser(x)) for x in scorer.logits(convs, span))
        else:  # a plain scorer: its float64 log-probabilities as they are
            kept = ((p, np.zeros((len(p), 1))) for p in scores(scorer, convs, span))
        self.memo = dict(zip((id(c) for c in convs), kept))

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes + z.nbytes for x, z in self.memo.values())

    def many(self, convs, span):
        for x, z in self.pairs(convs, span):
            yield x.astype(np.float64) - z

    def pairs(self, convs, span):
        """(logits, log-normaliser) of each conversation: kept ones, else computed (compare's `_logits`)."""
        for c in convs:
            if span == self.span and id(c) in self.memo:
                yield self.memo[id(c)]
            else:
                yield next(_logits(self.scorer, [c], span))


def _log_normaliser(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) per position, (n, 1) float64: exp in the logits' precision (each term relative
    to the row's maximum, so the terms that carry the sum are exact), summed in float64: within
    2e-8 of a float64 log-softmax's normaliser, 4x faster."""
    m = x.max(-1, keepdims=True)
    return m.astype(np.float64) + np.log(np.exp(x - m).sum(-1, keepdims=True, dtype=np.float64))


def reference_scores(scorer: Scorer, convs: Sequence[Conversation], span: str = "all") -> ReferenceScores:
    return ReferenceScores(scorer, convs, span)


# --------------------------------------------------------------------------------------------
# The comparison


def compare(reference: Scorer, candidate: Scorer, convs: Sequence[Conversation], span: str = "all") -> dict:
    """KL(reference || candidate) per position averaged over the span's positions of every
    conversation, top-1 agreement (%), and the candidate's perplexity on the conversations' tokens."""
    kls, agree, nll = [], [], []
    for conv, (x, zx), (y, zy) in zip(convs, _logits(reference, convs, span), _logits(candidate, convs, span)):
        if x.shape != y.shape:
            raise PipelineError(f"its logits have {y.shape[-1]} entries per token, the reference's {x.shape[-1]}.")
        kls.append(_kl_rows(x, zx, y, zy))
        agree.append(x.argmax(-1) == y.argmax(-1))
        nll.append(_nll(y, zy, conv, span))
    if not kls or not sum(len(k) for k in kls):
        raise PipelineError(f"nothing to compare: no conversation has {span!r} positions.")
    return {"kl": float(np.concatenate(kls).mean()),
            "top1_percent": round(100.0 * float(np.concatenate(agree).mean()), 2),
            "perplexity": _perplexity(nll), "positions": int(sum(len(k) for k in kls))}


def _logits(scorer: Scorer, convs: Sequence[Conversation], span: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each conversation's (logits x, log-normaliser z per position): its log-probabilities are x - z.
    The float32 logits as the model gave them where the scorer has them, else its float64
    log-probabilities and z = 0. Each pair is valid until the next one is asked for."""
    if isinstance(scorer, ReferenceScores):
        yield from scorer.pairs(convs, span)
    elif hasattr(scorer, "logits"):
        for x in scorer.logits(convs, span):
            yield x, _log_normaliser(x)
    else:
        for p in scores(scorer, convs, span):
            yield p, np.zeros((len(p), 1))


def _kl_rows(x: np.ndarray, zx: np.ndarray, y: np.ndarray, zy: np.ndarray) -> np.ndarray:
    """KL(softmax x || softmax y) per position, from logits and log-normalisers, in the logits' own
    precision: log p - log q = (x - y) - (zx - zy) is formed before exp weights it, so it keeps its
    small size exactly (float32 logits: 0.15 % off float64 at a KL of 5e-7, 2.5x faster than float64
    log-softmaxes of both sides)."""
    dtype = np.result_type(x, y)
    diff = np.subtract(x, y, dtype=dtype)
    diff -= (zx - zy).astype(dtype)
    p = np.exp(np.subtract(x, zx.astype(dtype), dtype=dtype))
    return np.einsum("ij,ij->i", p, diff).astype(np.float64)


def perplexity(scorer: Scorer, convs: Sequence[Conversation], span: str = "all") -> float:
    """exp(mean negative log-likelihood) of the conversations' own next tokens."""
    return _perplexity([_nll(x, z, c, span) for c, (x, z) in zip(convs, _logits(scorer, convs, span))])


def _nll(x: np.ndarray, z: np.ndarray, conv: Conversation, span: str) -> np.ndarray:
    """-log p(next token) from logits x and log-normalisers z (float64)."""
    targets = conv.targets(span)
    return z[: len(targets), 0] - x[np.arange(len(targets)), targets].astype(np.float64)


def _perplexity(nll: list[np.ndarray]) -> float:
    return round(float(math.exp(min(np.concatenate(nll).mean(), 50))), 4)


# --------------------------------------------------------------------------------------------
# Greedy answers


def mlx_answers(model, tokenizer, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy answers of an MLX model to chat prompts, batched."""
    from mlx_lm.generate import batch_generate
    from tqdm import tqdm

    encoded = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in prompts]
    answers: list[str] = []
    with tqdm(total=len(encoded), desc="generate", unit="answer", dynamic_ncols=True) as bar:
        for i in range(0, len(encoded), GEN_BATCH):
            chunk = encoded[i: i + GEN_BATCH]
            answers += [t.strip() for t in batch_generate(model, tokenizer, chunk, max_tokens=max_tokens).texts]
            bar.update(len(chunk))
    return answers


def gguf_answers(llm, meta: dict, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy answers of a llama.cpp model, each prompt rendered with the GGUF's own chat template
    (`meta` from gguf_metadata); all prompts decoded together (pipeline/gguf_batch.py)."""
    from . import gguf_batch
    from .untrusted.chat_template import render_chat

    if not meta.get("chat_template"):
        raise PipelineError("it has no chat template (tokenizer.chat_template): it cannot answer chat prompts.")
    ids = [llm.tokenize(render_chat(meta["chat_template"], m, meta["special_tokens"], True).encode("utf-8"),
                        add_bos=False, special=True) for m in prompts]
    return [llm.detokenize(out).decode("utf-8", "replace").strip() for out in gguf_batch.greedy(llm, ids, max_tokens)]


def gguf_metadata(llm) -> dict:
    """Type, chat template and special-token strings, as llama.cpp read them from the GGUF."""
    import llama_cpp
    from gguf import LlamaFileType

    meta = llm.metadata
    try:
        type_name = LlamaFileType(int(meta.get("general.file_type", -1))).name
        type_name = type_name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        type_name = meta.get("general.file_type", "?")
    vocab = llm._model.vocab
    special = {}
    for name, fn in (("bos_token", llama_cpp.llama_vocab_bos), ("eos_token", llama_cpp.llama_vocab_eos),
                     ("pad_token", llama_cpp.llama_vocab_pad)):
        if (idx := fn(vocab)) >= 0:
            special[name] = llm._model.token_get_text(idx)
    return {"type": type_name, "chat_template": meta.get("tokenizer.chat_template"), "special_tokens": special}


# --------------------------------------------------------------------------------------------
# Models


def load_trained(train_base: Path, adapters: Path, dtype: str = "float32"):
    """What training optimised: the training base with the adapter loaded, float32 by default (on
    CPU its quantized layers run dequantized, which is exact). Returns (model, tokenizer)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters

    from .modeling import load_model

    model, tokenizer, _ = load_model(Path(train_base), dtype)
    load_adapters(model, str(adapters))
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def context_length(convs: Sequence[Conversation], prompts_ids: Sequence[Sequence[int]] = (),
                   max_tokens: int = 0) -> int:
    """A llama.cpp context that holds every compared conversation and every prompt plus its answer."""
    longest = max([len(c.ids) for c in convs] + [len(p) + max_tokens for p in prompts_ids] + [1])
    return longest + max_tokens + 16
