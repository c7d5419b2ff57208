"""10 verify's batched measurements compute what the one-row-at-a-time ones did.

- llama.cpp: many conversations in one decode (pipeline/gguf_batch.py) give the logits that
  `Llama.eval` of each conversation alone gives, bit for bit, also when two lengths differ by one
  token (llama.cpp's one-token kernels would otherwise evaluate the longer one's last position);
- greedy answers decoded together equal answers generated one prompt at a time (prompt, then
  one token per step), stopping at end-of-generation or max_tokens;
- MLX: padded batches give each conversation's own log-probabilities, and the reference kept
  once (`reference_scores`: float32 logits + float64 normaliser) gives the KL recomputing it gave.
Real llama.cpp and MLX on the tiny llama fixture's GGUF (tests/gguf_fixtures.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_fixtures import converted_run
from pipeline import agreement, gguf_batch, llamacpp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_hf_model):
    cfg, _ = converted_run(tmp_path_factory, tiny_hf_model, "llama")
    run = Path(cfg.models_dir) / cfg.run
    llm = llamacpp.open_gguf(run / "gguf" / "t-Q8_0.gguf", 512, 0)
    yield run, llm
    llm.close()


def _one_by_one(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _greedy_one_by_one(llm, prompt, max_tokens):
    """What verify did before batching: prompt evaluated, then one token per step."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            break
        out.append(tok)
        llm.eval([tok])
    return out


def test_batched_logits_equal_one_conversation_at_a_time(tiny):
    _, llm = tiny
    rng = np.random.default_rng(0)
    # Lengths 40 and 41 (a one-token tail), a short one; spans from the start, inside, at the end.
    seqs = [rng.integers(3, 400, n).tolist() for n in (40, 41, 7, 30)]
    spans = [(0, 40), (5, 40), (0, 7), (12, 29)]
    got = [x.copy() for x in gguf_batch.logits(llm, seqs, spans)]
    for s, (a, b), g in zip(seqs, spans, got):
        want = _one_by_one(llm, s)[a:b]
        assert g.shape == want.shape
        np.testing.assert_array_equal(g, want)


def test_logits_and_answers_do_not_depend_on_the_thread_count(tiny, monkeypatch):
    """Contexts take as many threads as there are free cores: one or all must give the same bits."""
    import pipeline.runtime as runtime

    _, llm = tiny
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 400, n).tolist() for n in (33, 20)]
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(runtime, "free_cores", lambda threads=threads: threads)
        logits = [x.copy() for x in gguf_batch.logits(llm, seqs, [(0, len(s)) for s in seqs])]
        runs.append((logits, gguf_batch.greedy(llm, [s[:9] for s in seqs], 6)))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1] == runs[1][1]


def test_free_cores_leaves_out_the_busy_ones():
    """Every allowed core kept busy by another process: one thread; the count never exceeds them."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.runtime import free_cores

    allowed = len(os.sched_getaffinity(0))
    assert 1 <= free_cores() <= allowed
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(allowed)]
    try:
        time.sleep(0.5)
        assert free_cores(window=0.5) == 1
    finally:
        for b in burners:
            b.kill()
            b.wait()


def test_free_cores_counts_this_process_own_busy_threads_as_free():
    """A thread of ours spinning (as BLAS and OpenMP workers do after a forward) is not another
    process's load: it must not take a core from llama.cpp's next context."""
    import os
    import threading

    from pipeline.runtime import free_cores

    allowed = len(os.sched_getaffinity(0))
    if allowed < 2 or free_cores(window=0.5) < allowed:
        pytest.skip("needs 2 or more cores that other processes leave idle")
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        assert free_cores(window=0.5) == allowed
    finally:
        stop.set()
        spinner.join()


def test_groups_respect_their_bounds(monkeypatch):
    monkeypatch.setattr(gguf_batch, "MAX_SEQS", 2)
    assert gguf_batch._groups([10, 10, 10], [10, 10, 10], 100) == [[0, 1], [2]]
    monkeypatch.setattr(gguf_batch, "MAX_OUTPUT_FLOATS", 1500)
    assert gguf_batch._groups([10, 10, 10], [10, 10, 10], 100) == [[0], [1], [2]]  # 1,000 floats each


def test_greedy_answers_equal_one_prompt_at_a_time(tiny):
    _, llm = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 400, n).tolist() for n in (12, 13, 5, 20, 9)]
    got = gguf_batch.greedy(llm, prompts, 10)
    want = [_greedy_one_by_one(llm, p, 10) for p in prompts]
    assert got == want
    assert all(len(a) <= 10 for a in got)


def test_reference_kept_once_gives_the_same_comparison(tiny):
    import mlx.core as mx
    from transformers import AutoTokenizer

    from pipeline.modeling import load_model

    run, llm = tiny
    model, _, _ = load_model(run / "fused", "float32")
    tokenizer = AutoTokenizer.from_pretrained(str(run / "fused"))
    convs = agreement.conversations(tokenizer, agreement.read_rows(run / "data" / "test.jsonl"))
    # Padded batches: each conversation's log-probabilities as its own forward gives them.
    for conv, p in zip(convs, agreement.scores(agreement.mlx_scorer(model), convs, "all")):
        alone = agreement.log_softmax(np.array(model(mx.array([conv.ids]))[0].astype(mx.float32)))
        np.testing.assert_allclose(p, alone, atol=2e-5)
    kept = agreement.reference_scores(agreement.mlx_scorer(model), convs, "all")
    assert kept.nbytes == sum(len(c.ids) for c in convs) * (llm.n_vocab() * 4 + 8)
    candidate = agreement.gguf_scorer(llm)
    for span in ("all", "answer"):
        fresh = agreement.compare(agreement.mlx_scorer(model), candidate, convs, span)
        again = agreement.compare(kept, candidate, convs, span)
        assert again["kl"] == pytest.approx(fresh["kl"], rel=1e-9)
        assert again["top1_percent"] == fresh["top1_percent"] and again["positions"] == fresh["positions"]
        assert again["perplexity"] == fresh["perplexity"]
