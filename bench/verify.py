"""10 verify of one GGUF vs llama.cpp's own KL tool, `llama-perplexity --kl-divergence`, on the same tokens.

    python -m bench.verify              # 2 repeats of each (make bench)
    python -m bench.verify --repeats 3

Input (built once under bench/work/verify/): the embedded SmolLM2-135M (02 base of bench.inputs'
smollm2 run) as base/, fused/ and hf/ of a run of our own, 60 rows of the bundled task as its test
split, and 09's F16 and Q8_0 GGUFs of it. Our run keeps only the Q8_0 file in gguf/.
Ours, with the demo's counts (24 test chats compared token by token, 30 answered):
- `verify-kl`: `mlx-pipeline verify --max-samples 0`: the MLX reference (float32) and the Q8_0
  file's KL, top-1 and perplexity over the 24 chats, with the tokenizer and chat template checks:
  the anchor's measurement;
- `verify`: the whole phase, + greedy answers of 30 rows by MLX and by llama.cpp for the task
  metric (work the anchor does not do).
Anchor: the same 24 chats rendered with the chat template into one text file;
`llama-perplexity -m F16.gguf -f chats.txt -c C --kl-divergence-base ref.kld` (the reference's
log-probabilities, from the F16 file), then `llama-perplexity -m Q8_0.gguf -c C
--kl-divergence-base ref.kld --kl-divergence`; C is the chats' mean length, so that its 24 chunks
hold as many tokens as our 24 chats (llama-perplexity scores the second half of each chunk).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from . import harness, inputs
from .harness import WORK, Cmd

HERE = WORK / "verify"
MODELS = HERE / "runs"
RUN = "smollm2-verify"  # base, fused, hf, data, gguf F16 + Q8_0
ONE = "smollm2-verify-q8"  # the same, gguf/ holding only the Q8_0 file: what ours verifies
ROWS, ANSWERED = 24, 30  # the demo's verify.max_rows and verify.max_samples
CONFIG = """\
run: {run}
seed: 0
model:
  source: embedded:smollm2
eval:
  max_tokens: 64
gguf:
  quantizations: [Q8_0]
  imatrix: false
  native: false
  adapter_gguf: false
verify:
  max_rows: {rows}
  max_samples: {answered}
"""


def config(run: str) -> Path:
    path = HERE / f"{run}.yaml"
    text = CONFIG.format(run=run, rows=ROWS, answered=ANSWERED)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def run_args(run: str) -> list[str]:
    return ["--config", str(config(run)), "--run", run, "--models-dir", str(MODELS)]


def prepared() -> Path:
    """The run with F16 + Q8_0 (built once), and the Q8_0-only copy ours verifies (hard links)."""
    from pipeline.config import load_config
    from pipeline.data.sample_task import generate_rows
    from pipeline.fsio import hash_model_dir, write_jsonl
    from pipeline.manifest import write_manifest

    run_dir = MODELS / RUN
    if not (run_dir / "gguf" / "manifest.json").exists():
        base = inputs.prepared_run("smollm2", ("base",)) / "base"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(str(config(RUN)), {"models_dir": str(MODELS), "run": RUN}, env={})
        started = time.time()
        digest = hash_model_dir(base)
        for name in ("base", "fused", "hf"):  # the model itself stands for the fused model (no adapter)
            run_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(base), str(run_dir / name)], check=True)
            (run_dir / name / "manifest.json").unlink()
            write_manifest(run_dir / name, f"bench {name}", cfg, started,
                           inputs={"model": str(base), "fused": {"content_hash": digest}},
                           outputs={"path": str(run_dir / name), "content_hash": digest})
        write_jsonl(run_dir / "data" / "test.jsonl", generate_rows(60, seed=1))
        write_manifest(run_dir / "data", "bench data", cfg, started, inputs={}, outputs={})
        print("[verify] 09 gguf F16 + Q8_0 of SmolLM2-135M (once)", flush=True)
        subprocess.run([*inputs.cli(), "gguf", *run_args(RUN)], check=True)
    one = MODELS / ONE
    if not (one / "gguf" / f"{RUN}-Q8_0.gguf").exists():
        shutil.rmtree(one, ignore_errors=True)
        subprocess.run(["cp", "-al", str(run_dir), str(one)], check=True)
        shutil.rmtree(one / "verify", ignore_errors=True)
        (one / "gguf" / f"{RUN}-F16.gguf").unlink()
    return run_dir


def chats_text(run_dir: Path) -> tuple[Path, int, int]:
    """The compared chats as llama-perplexity's text file; returns (file, chunk size C, our tokens)."""
    from transformers import AutoTokenizer

    from pipeline import agreement

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "fused"))
    rows = agreement.read_rows(run_dir / "data" / "test.jsonl")
    ours = sum(len(c.ids) for c in agreement.conversations(tokenizer, rows[:ROWS]))
    chunk = round(ours / ROWS)
    texts = [tokenizer.apply_chat_template(agreement.full_conversation(r), tokenize=False) for r in rows]
    # Enough text for ROWS chunks of C tokens (a chat more than ours covers tokenization at the joins).
    n = ROWS
    while len(tokenizer.encode("".join(texts[:n]), add_special_tokens=False)) < ROWS * chunk + chunk and n < len(rows):
        n += 1
    path = HERE / "chats.txt"
    path.write_text("".join(texts[:n]))
    return path, chunk, ours


def _anchor_kl(log: str) -> dict[str, float]:
    m = re.search(r"Mean\s+KLD:\s+([-\d.e+]+)", log)
    return {"kl": float(m[1])} if m else {}


def _ours_kl(report: Path):
    def read(_log: str) -> dict[str, float]:
        rows = json.loads(report.read_text())["models"] if report.exists() else []
        kl = next((r["kl"] for r in rows if r.get("kl") is not None), None)
        return {"kl": kl} if kl is not None else {}
    return read


def main(argv: list[str] | None = None) -> list[dict]:
    from pipeline import llamacpp

    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    perplexity = llamacpp.tool("llama-perplexity")
    run_dir = prepared()
    text, chunk, ours_tokens = chats_text(run_dir)
    f16, q8 = run_dir / "gguf" / f"{RUN}-F16.gguf", run_dir / "gguf" / f"{RUN}-Q8_0.gguf"
    kld = HERE / "ref.kld"
    anchor = Cmd(["bash", "-c", f"{perplexity} -m {f16} -f {text} -c {chunk} --chunks {ROWS} "
                  f"--kl-divergence-base {kld} && "
                  f"{perplexity} -m {q8} -c {chunk} --kl-divergence-base {kld} --kl-divergence"],
                 before=lambda: kld.unlink(missing_ok=True), figures=_anchor_kl,
                 label=f"llama-perplexity --kl-divergence-base (F16) then --kl-divergence (Q8_0), -c {chunk}")
    report = MODELS / ONE / "verify" / "report.json"
    clear = lambda: shutil.rmtree(MODELS / ONE / "verify", ignore_errors=True)  # noqa: E731
    what = (f"SmolLM2-135M Q8_0 vs its reference over {ROWS} test chats ({ours_tokens} tokens ours, "
            f"{ROWS} x {chunk} anchor); CPU")
    rows = [harness.compare(
        "verify-kl-vs-llama-perplexity",
        Cmd([*inputs.cli(), "verify", *run_args(ONE), "--max-samples", "0"], before=clear, figures=_ours_kl(report),
            label="mlx-pipeline verify --max-samples 0 (one Q8_0 file vs MLX float32)"),
        anchor, repeats=args.repeats, what=what + "; ours: KL, top-1, perplexity, tokenizer and template checks")]
    rows.append(harness.compare(
        "verify-vs-llama-perplexity",
        Cmd([*inputs.cli(), "verify", *run_args(ONE)], before=clear, figures=_ours_kl(report),
            label=f"mlx-pipeline verify (one Q8_0 file; + {ANSWERED} greedy answers by MLX and llama.cpp)"),
        anchor, repeats=args.repeats,
        what=what + f"; ours also answers {ANSWERED} rows (task metric), the anchor does not"))
    for r in rows:
        print(f"{r['ours']['label']}: {r['ours']['wall_s']} s vs {r['anchor']['wall_s']} s "
              f"(ratio {r['ratio'].get('wall_s')}); KL ours {r['ours'].get('kl')} anchor {r['anchor'].get('kl')}")
    return rows


if __name__ == "__main__":
    main()
