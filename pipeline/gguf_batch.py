"""llama.cpp evaluating many token sequences at once, for measurements (pipeline/agreement.py).

A loaded model (`llama_cpp.Llama`) gets a context of its own in which every sequence has its own KV
stream (a distinct seq_id, `kv_unified` off, as `llama-perplexity` runs its chunks): a group of
sequences goes through one `llama_decode`, with logits only at the positions asked for.
- `logits`: the logits of each sequence at a range of its positions (10 verify's KL and top-1).
- `greedy`: argmax answers to many prompts, the prompts evaluated once and then one token per
  active sequence per step, each stopping at an end-of-generation token or `max_tokens`.
Batches are built from numpy arrays, with no Python loop over tokens. A group is bounded by
KV cells and by the floats of its logits, so memory does not grow with the number of rows.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import PipelineError

MAX_CELLS = 8192  # KV cells of one context (all its streams together)
MAX_OUTPUT_FLOATS = 64 * 2**20  # logits of one decode: 256 MB of float32
MAX_SEQS = 32  # sequences of one context
PAD = 256  # llama.cpp sizes a KV stream in multiples of this


def _padded(n: int) -> int:
    return -(-n // PAD) * PAD


@contextlib.contextmanager
def _context(llm, seq_len: int, n_seq: int, n_batch: int, generating: bool = False):
    """A llama.cpp context on `llm`'s model with `n_seq` streams of `seq_len` cells (the LoRA of
    `llm` applied), freed on exit. Its threads: the cores other processes leave free now
    (runtime.free_cores), at most llm's batch threads (all cores); where that cannot be measured,
    llm's generation threads (llama-cpp-python's default, half the cores) when `generating`, else
    its batch threads. The logits do not depend on the thread count (bit for bit)."""
    import llama_cpp
    from llama_cpp import _internals

    from .runtime import free_cores

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max = n_seq
    params.kv_unified = False  # one stream per sequence: attention never spans two rows
    params.n_ctx = n_seq * _padded(seq_len)
    params.n_batch = max(n_batch, 1)
    params.n_ubatch = min(params.n_batch, 512)
    # llama.cpp takes n_threads for one-token batches, n_threads_batch for the rest: one count for
    # both. A thread more than the free cores stalls every operation's barrier (free_cores).
    free = free_cores()
    threads = min(free, params.n_threads_batch) if free else (params.n_threads if generating
                                                              else params.n_threads_batch)
    params.n_threads = params.n_threads_batch = threads
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    try:
        if getattr(llm, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
            scales = (ctypes.c_float * 1)(llm.lora_scale)
            if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, scales):
                raise PipelineError("llama.cpp could not apply the LoRA GGUF to a new context.")
        yield ctx
    finally:
        ctx.close()


class _Batch:
    """A llama_batch over numpy arrays (kept alive with it): token, position, sequence and whether
    its logits are wanted, one entry per token."""

    def __init__(self, tokens, positions, seqs, outputs):
        import llama_cpp

        self.token = np.ascontiguousarray(tokens, dtype=np.int32)
        self.pos = np.ascontiguousarray(positions, dtype=np.int32)
        self.seq = np.ascontiguousarray(seqs, dtype=np.int32)
        self.n_seq_id = np.ones(len(self.token), dtype=np.int32)
        self.logits = np.ascontiguousarray(outputs, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to that token's (single) sequence id.
        self.seq_ptr = (self.seq.ctypes.data + self.seq.itemsize * np.arange(len(self.seq))).astype(np.uintp)
        p = lambda a, t: a.ctypes.data_as(ctypes.POINTER(t))  # noqa: E731
        self.struct = llama_cpp.llama_batch(
            n_tokens=len(self.token), token=p(self.token, llama_cpp.llama_token), embd=None,
            pos=p(self.pos, llama_cpp.llama_pos), n_seq_id=p(self.n_seq_id, ctypes.c_int32),
            seq_id=p(self.seq_ptr, ctypes.POINTER(llama_cpp.llama_seq_id)), logits=p(self.logits, ctypes.c_int8))
        self.n_outputs = int(self.logits.sum())


def _decode(ctx, batch: _Batch, n_vocab: int) -> np.ndarray:
    """Decode one batch; the logits of its output tokens in batch order, (n_outputs, n_vocab) float32
    (a view of llama.cpp's buffer: valid until the next decode on `ctx`)."""
    import llama_cpp

    rc = llama_cpp.llama_decode(ctx.ctx, batch.struct)
    if rc != 0:
        raise PipelineError(f"llama.cpp could not evaluate a batch of {len(batch.token)} tokens (llama_decode {rc}).")
    if not batch.n_outputs:
        return np.empty((0, n_vocab), np.float32)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx.ctx), shape=(batch.n_outputs, n_vocab))


def _groups(lengths: Sequence[int], outputs: Sequence[int], n_vocab: int) -> list[list[int]]:
    """Consecutive sequences packed into groups within MAX_SEQS, MAX_CELLS and MAX_OUTPUT_FLOATS
    (a single sequence beyond the bounds forms a group of its own)."""
    groups: list[list[int]] = []
    cells = floats = 0
    for i, (n, k) in enumerate(zip(lengths, outputs)):
        if groups and len(groups[-1]) < MAX_SEQS and cells + _padded(n) <= MAX_CELLS \
                and floats + k * n_vocab <= MAX_OUTPUT_FLOATS:
            groups[-1].append(i)
            cells, floats = cells + _padded(n), floats + k * n_vocab
        else:
            groups.append([i])
            cells, floats = _padded(n), k * n_vocab
    return groups


def _rows(seqs: Sequence[Sequence[int]], group: list[int], width: int):
    """Tokens, positions and sequence ids of a group, each sequence right-padded to `width`.
    Equal lengths make llama.cpp split the batch into equal slices of whole sequences: a slice of
    a single token would take its one-token kernels, whose logits differ (by up to 0.6 on a Q4_1
    SmolLM2) from the many-token ones that evaluate every other position. A causal model's
    positions never see the padding after them."""
    tokens = np.zeros((len(group), width), dtype=np.int32)
    for row, i in enumerate(group):
        tokens[row, : len(seqs[i])] = seqs[i]
    positions = np.tile(np.arange(width, dtype=np.int32), len(group))
    return tokens.reshape(-1), positions, np.repeat(np.arange(len(group), dtype=np.int32), width)


def logits(llm, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
    """For each sequence, in order, its float32 logits at positions spans[i] = (start, stop), shape
    (stop - start, n_vocab). Each array is a view of llama.cpp's buffer, valid until the next one is
    asked for: copy what you keep."""
    n_vocab = llm.n_vocab()
    lengths = [len(s) for s in seqs]
    outputs = [max(stop - start, 0) for start, stop in spans]
    groups = _groups(lengths, outputs, n_vocab)
    if not groups:
        return
    widths = [max(lengths[i] for i in g) for g in groups]
    with _context(llm, max(widths), max(len(g) for g in groups),
                  max(w * len(g) for w, g in zip(widths, groups))) as ctx:
        for group, width in zip(groups, widths):
            ctx.kv_cache_clear()
            tokens, positions, seq_ids = _rows(seqs, group, width)
            start = np.repeat([spans[i][0] for i in group], width)
            stop = np.repeat([spans[i][1] for i in group], width)
            out = _decode(ctx, _Batch(tokens, positions, seq_ids, (positions >= start) & (positions < stop)), n_vocab)
            row = 0
            for i in group:
                yield out[row: row + outputs[i]]
                row += outputs[i]


def greedy(llm, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations (argmax of llama.cpp's logits) of each prompt, without the
    end-of-generation token that stops one; at most `max_tokens` each. The prompts are evaluated
    together, then every unfinished answer gets its next token in one decode per step."""
    import llama_cpp

    n_vocab = llm.n_vocab()
    vocab = llm._model.vocab
    eog: dict[int, bool] = {}
    answers: list[list[int]] = [[] for _ in prompts]
    if max_tokens <= 0 or not prompts:
        return answers
    lengths = [len(p) for p in prompts]
    model = llm._model.model
    recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
    for group in _groups([n + max_tokens for n in lengths], [1] * len(prompts), n_vocab):
        width = max(lengths[i] for i in group)
        spare = len(group)  # a stand-in sequence: a step never decodes a lone token (see _rows)
        with _context(llm, width + max_tokens, len(group) + 1, max(width, 2) * len(group), generating=True) as ctx:
            if recurrent:  # a recurrent state cannot drop padding: prompts as they are
                tokens = np.concatenate([np.asarray(prompts[i], dtype=np.int32) for i in group])
                positions = np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in group])
                seq_ids = np.repeat(np.arange(len(group), dtype=np.int32), [lengths[i] for i in group])
            else:
                tokens, positions, seq_ids = _rows(prompts, group, width)
            last = positions == np.repeat([lengths[i] - 1 for i in group], [lengths[i] if recurrent else width
                                                                              for i in group])
            nxt = _decode(ctx, _Batch(tokens, positions, seq_ids, last), n_vocab).argmax(-1).tolist()
            for row, i in enumerate(group if not recurrent else []):  # drop the padding: answers go there
                llama_cpp.llama_memory_seq_rm(ctx.memory, row, lengths[i], -1)
            active = list(range(len(group)))
            while True:
                still = []
                for row, tok in zip(active, nxt):
                    if tok not in eog:
                        eog[tok] = bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
                    if not eog[tok]:
                        answers[group[row]].append(tok)
                        if len(answers[group[row]]) < max_tokens:
                            still.append(row)
                active = still
                if not active:
                    break
                toks = [answers[group[r]][-1] for r in active]
                pos = [lengths[group[r]] + len(answers[group[r]]) - 1 for r in active]
                seq = list(active)
                if len(active) == 1:
                    llama_cpp.llama_memory_seq_rm(ctx.memory, spare, -1, -1)
                    toks, pos, seq = toks * 2, pos[:1] + [0], seq + [spare]
                out = _decode(ctx, _Batch(toks, pos, seq, np.ones(len(toks), bool)), n_vocab)
                nxt = out[: len(active)].argmax(-1).tolist()
    return answers
