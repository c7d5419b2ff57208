"""10 verify: every GGUF measured in llama.cpp's runtime against the MLX model, numbers not files.

Per architecture: the F16 GGUF's next-token distributions equal MLX's (mean KL <= 1e-4, the phase's
own threshold is 1e-3), Q8_0 stays close (<= 0.02), the K-quants load and are measured.
Then the failures verify exists for: a changed chat template, a changed tokenizer (both with the
model's weights untouched, so KL alone would not notice), a file that does not load, and a GGUF
that no longer matches the MLX model. The slow test does the same on the real SmolLM2-135M.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_fixtures import converted_run, copy_run, make_cfg, make_run, rerecord, rewrite_gguf
from pipeline import cli
from pipeline.errors import MissingInputError, PipelineError
from pipeline.fsio import hash_model_dir
from pipeline.phases.p09_convert_to_gguf import convert_to_gguf
from pipeline.phases.p10_verify_gguf import verify_gguf


def by_type(result) -> dict:
    return {r["type"]: r for r in result.rows}


@pytest.mark.parametrize("model_type", ["llama", "granite", "granitemoehybrid"])
def test_gguf_matches_mlx_per_architecture(tmp_path_factory, tiny_hf_model, model_type):
    cfg, _ = converted_run(tmp_path_factory, tiny_hf_model, model_type)
    result = verify_gguf(cfg)
    rows = by_type(result)
    assert result.passed and set(rows) == {"F16", "Q8_0", "Q5_K_M", "Q4_K_M", "MLX"}
    f16, q8, mlx = rows["F16"], rows["Q8_0"], rows["MLX"]
    print({t: (r["kl"], r["top1_percent"], r["perplexity"]) for t, r in rows.items()})
    assert f16["kl"] <= 1e-4 and f16["top1_percent"] >= 95.0
    assert f16["perplexity"] == pytest.approx(mlx["perplexity"], rel=1e-3)
    assert q8["kl"] <= 0.02
    for t in ("Q5_K_M", "Q4_K_M"):  # loadable and measured; coarser than Q8_0
        assert np.isfinite(rows[t]["kl"]) and q8["kl"] < rows[t]["kl"] < 0.5, t
    assert f16["kl"] < q8["kl"]
    for t in ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"):
        assert rows[t]["tokenizer_equal"] and rows[t]["chat_template_equal"], t
        assert rows[t]["metric"]["n"] == 2 and rows[t]["metric"]["primary"] == "json_match"
    assert mlx["metric"]["n"] == 2

    out = Path(cfg.models_dir) / "t" / "verify"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["rows_compared"] == 3 and len(report["models"]) == 5
    md = (out / "report.md").read_text()
    assert "| t-F16.gguf | fused/ | F16 |" in md and "PASSED" in md
    assert "| fused/ (MLX) | MLX fused (reference) | MLX |" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["inputs"]["gguf"]) == ["t-F16.gguf", "t-Q4_K_M.gguf", "t-Q5_K_M.gguf", "t-Q8_0.gguf"]


def _f16_only_copy(tmp_path_factory, tiny_hf_model, root: Path, **keys):
    cfg, _ = converted_run(tmp_path_factory, tiny_hf_model, "llama")
    cfg = copy_run(cfg, root, **keys)
    gguf = root / "t" / "gguf"
    for f in gguf.glob("t-Q*.gguf"):
        f.unlink()
    return cfg, gguf


def test_verify_fails_on_template_tokenizer_and_broken_files(tmp_path, tmp_path_factory, tiny_hf_model):
    from transformers import AutoTokenizer

    cfg, gguf = _f16_only_copy(tmp_path_factory, tiny_hf_model, tmp_path)
    f16 = gguf / "t-F16.gguf"
    # 1. Same weights and tokenizer, another default system prompt in the chat template.
    rewrite_gguf(f16, gguf / "t-template.gguf",
                 {"tokenizer.chat_template": lambda t: t.replace("named SmolLM", "named Bob")})
    # 2. Same weights and template; two tokens of the first test row swap their strings.
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t" / "fused"))
    row = json.loads((tmp_path / "t" / "data" / "test.jsonl").read_text().splitlines()[0])
    ids = tok.apply_chat_template(row["messages"], return_dict=False)
    a, b = [i for i in dict.fromkeys(ids) if i not in tok.all_special_ids][:2]

    def swap(tokens):
        tokens = list(tokens)
        tokens[a], tokens[b] = tokens[b], tokens[a]
        return tokens

    rewrite_gguf(f16, gguf / "t-tokens.gguf", {"tokenizer.ggml.tokens": swap})
    # 3. A download cut short, and a file that is not a GGUF at all.
    (gguf / "t-truncated.gguf").write_bytes(f16.read_bytes()[: f16.stat().st_size // 2])
    (gguf / "junk.gguf").write_bytes(np.random.default_rng(0).bytes(4096))

    args = ["verify", "--run", "t", "--models-dir", str(tmp_path), "--max-rows", "2", "--max-samples", "0"]
    res = CliRunner().invoke(cli.main, args, env={"TEST_MODE": ""})
    assert res.exit_code == 2, res.output
    message = res.output[res.output.index("verify FAILED"):]
    assert "t-template.gguf: its chat template differs from the trained model's" in message
    assert "named Bob, trained" in message and "named SmolLM, trained" in message
    assert "t-tokens.gguf: llama.cpp tokenizes differently from the trained model's tokenizer (test row 0" in message
    # Refused by the header validator (pipeline/untrusted/gguf_header.py) before llama.cpp reads them.
    assert "t-truncated.gguf is not a valid GGUF, not loaded" in message
    assert "junk.gguf is not a valid GGUF, not loaded" in message
    assert "t-F16.gguf" not in message

    report = json.loads((tmp_path / "t" / "verify" / "report.json").read_text())
    rows = {r["file"]: r for r in report["models"]}
    assert not report["passed"] and len(report["failures"]) == 4
    assert rows["t-F16.gguf"]["tokenizer_equal"] and rows["t-F16.gguf"]["chat_template_equal"]
    assert rows["t-template.gguf"]["tokenizer_equal"] and not rows["t-template.gguf"]["chat_template_equal"]
    assert rows["t-tokens.gguf"]["chat_template_equal"] and not rows["t-tokens.gguf"]["tokenizer_equal"]
    # The weights are the F16 file's: the numbers alone would not have caught either.
    for f in ("t-template.gguf", "t-tokens.gguf"):
        assert rows[f]["kl"] == pytest.approx(rows["t-F16.gguf"]["kl"], rel=1e-6, abs=1e-9)
    assert rows["junk.gguf"]["kl"] is None and rows["t-truncated.gguf"]["kl"] is None
    assert "**FAILED**" in (tmp_path / "t" / "verify" / "report.md").read_text()
    assert not (tmp_path / "t" / "verify" / "manifest.json").exists()


def test_verify_fails_when_the_gguf_no_longer_matches_the_mlx_model(tmp_path, tmp_path_factory, tiny_hf_model):
    """A GGUF that does not compute what the MLX model computes, though every manifest says it was
    made from it (an export bug): F16 KL exceeds 1e-3. Simulated by changing the fused weights and
    re-recording the manifests (an edit behind them is refused earlier, by the hash checks)."""
    import mlx.core as mx

    cfg, gguf = _f16_only_copy(tmp_path_factory, tiny_hf_model, tmp_path, **{"verify.max_samples": 0})
    weights = tmp_path / "t" / "fused" / "model.safetensors"
    tensors = mx.load(str(weights))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name] + 0.05 * mx.random.normal(tensors[name].shape, key=mx.random.key(0))
    mx.save_safetensors(str(weights), tensors, metadata={"format": "pt"})
    with pytest.raises(PipelineError, match=r"changed since"):
        verify_gguf(cfg)
    rerecord(weights.parent)
    hf_manifest = tmp_path / "t" / "hf" / "manifest.json"
    data = json.loads(hf_manifest.read_text())
    data["inputs"]["fused"]["content_hash"] = hash_model_dir(weights.parent)
    hf_manifest.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=r"t-F16.gguf: F16 KL divergence .* exceeds verify.f16_max_kl = 0.001"):
        verify_gguf(cfg)
    kl = json.loads((tmp_path / "t" / "verify" / "report.json").read_text())["models"][0]["kl"]
    assert kl > 1e-3


def test_verify_refuses_ggufs_of_an_earlier_fused_model(tmp_path, tmp_path_factory, tiny_hf_model):
    """Re-fused after export (manifests say so): verify names the stale chain instead of measuring it."""
    cfg, _ = _f16_only_copy(tmp_path_factory, tiny_hf_model, tmp_path, **{"verify.max_samples": 0})
    config = tmp_path / "t" / "fused" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "re_fused": True}))
    with pytest.raises(PipelineError, match=r"changed since"):  # edited behind its manifest
        verify_gguf(cfg)
    rerecord(config.parent)  # as a new `make fuse` would record it
    with pytest.raises(PipelineError, match=r"not made from the current fused model.*make gguf"):
        verify_gguf(cfg)


def test_verify_needs_gguf_files(tmp_path, tiny_hf_model):
    cfg = make_run(tmp_path, tiny_hf_model("llama"))
    with pytest.raises(MissingInputError, match=r"make gguf"):
        verify_gguf(cfg)


@pytest.mark.slow
def test_smollm2_gguf_matches_mlx(tmp_path):
    """The real SmolLM2-135M base: F16 KL vs MLX <= 1e-3 (PLATFORM_NOTES: 1.9e-6), Q8_0 <= 0.02."""
    from pipeline.phases.p02_fetch_base_model import fetch_base_model

    base = fetch_base_model(make_cfg(tmp_path / "fetch", "smol")).path
    cfg = make_run(tmp_path / "run", base, **{"gguf.quantizations": ["Q8_0", "Q4_K_M"], "verify.max_rows": 4,
                                               "verify.max_samples": 4, "eval.max_tokens": 48})
    gguf = convert_to_gguf(cfg)
    assert {r["type"]: r["bits_per_weight"] for r in gguf.table}["Q8_0"] < 10
    result = verify_gguf(cfg)
    rows = by_type(result)
    print({t: (r["kl"], r["top1_percent"], r["perplexity"], r.get("metric", {}).get("json_valid"))
           for t, r in rows.items()})
    assert result.passed
    assert rows["F16"]["kl"] <= 1e-3 and rows["F16"]["top1_percent"] >= 99.0
    assert rows["Q8_0"]["kl"] <= 0.02
    assert rows["F16"]["kl"] < rows["Q8_0"]["kl"] < rows["Q4_K_M"]["kl"]
    assert rows["F16"]["perplexity"] == pytest.approx(rows["MLX"]["perplexity"], rel=5e-3)


def test_chat_templates_render_in_a_sandbox():
    """GGUF chat templates are untrusted: rendered as transformers does, in an immutable sandbox."""
    from pipeline.phases.p10_verify_gguf import render_chat

    template = ("{{ bos_token }}{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
                "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    assert render_chat(template, [{"role": "user", "content": "Zoë"}], {"bos_token": "<s>"}, True) == '<s>"Zoë">'
    for unsafe in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set x = [] %}{{ x.append(1) }}",
                   "{{ raise_exception('no system role') }}"):
        with pytest.raises(PipelineError, match="its chat template does not render"):
            render_chat(unsafe, [], {})
