"""Shared test fixtures: the SmolLM2 tokenizer and tiny random models, built once per session.

- `smollm2_tokenizer_dir`: the SmolLM2 tokenizer (from the embedded GGUF) saved as a Hugging Face
  tokenizer folder. Nothing is downloaded.
- `tiny_hf_model`: a factory `make(name) -> Path` building a tiny random model with real
  transformers from `tests/fixtures/configs/<name>.json` (hidden 64, 2-6 layers, the SmolLM2
  vocabulary unless VOCAB_GGUF names another), cached per name. A file is named by its
  `model_type`, or `<model_type>-<variant>` for another shape of the same architecture
  (granitemoehybrid-moe, llama-3): the model_type is always read from the file. The folder
  holds safetensors weights, the tokenizer and a config.json in the Hub form (top-level
  `rope_theta`, granitemoehybrid `layer_types` as mamba/attention): transformers 5
  `save_pretrained` writes `rope_parameters` and renamed layer types, which mlx-lm 0.32 rejects
  or misreads (PLATFORM_NOTES.md), so the fixture file is written back over it. Both mlx-lm and
  transformers load every such folder.
- `fresh_env`: an empty environment for `load_config(..., env=...)`, so the developer's shell
  (LORA_RANK, TEST_MODE, ...) cannot leak into config tests.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

# Trained/fused tiny runs shared by the export tests (phases 07-10), registered here once.
from export_fixtures import export_runs  # noqa: F401
from shipped_fixtures import shipped_run  # noqa: F401

# The suite's tiny models, runs and GGUFs peak at ~6.3 GB under the temporary folder (a passing test's
# tmp_path is deleted when it ends: pyproject.toml). With less free, one clear stop, not ENOSPC errors.
SUITE_FREE_BYTES = 8 * 10**9


def pytest_sessionstart(session):
    where = session.config.option.basetemp or tempfile.gettempdir()
    probe = Path(where)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < SUITE_FREE_BYTES:
        pytest.exit(f"Only {free / 1e9:.1f} GB free under {where}; the test suite needs "
                    f"{SUITE_FREE_BYTES / 1e9:.0f} GB. Free some space (old /tmp/pytest-of-* folders, "
                    "bench/work/) or point --basetemp at a larger disk.", returncode=1)


FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_CONFIGS = FIXTURES / "configs"
# Fixture names (file stems): one per model_type, plus variants such as granitemoehybrid-moe.
TINY_FIXTURES = sorted(p.stem for p in FIXTURE_CONFIGS.glob("*.json"))
TINY_MODEL_TYPES = sorted({json.loads(p.read_text())["model_type"] for p in FIXTURE_CONFIGS.glob("*.json")})


# Architectures whose tiny model needs its family's own tokenizer instead of SmolLM2's: transformers 5
# gives a qwen2 folder its Qwen2 tokenizer class whatever the files say, and llama.cpp's converter
# recognises that pre-tokenizer only with Qwen2's vocabulary (a vocabulary-only GGUF in llama.cpp's
# models/, extracted by `make setup`). (model_type -> (vocabulary GGUF, eos token))
VOCAB_GGUF = {"qwen2": ("ggml-vocab-qwen2.gguf", "<|im_end|>")}
# llama.cpp's phi3 converter reads a BPE vocabulary only when tokenizer_class is GPT2Tokenizer
# (Phi-4-mini's own value); otherwise it asks for a sentencepiece tokenizer.model.
TOKENIZER_CLASS = {"phi3": "GPT2Tokenizer"}


def fixture_config(name: str) -> dict:
    """The Hub-style config.json of a tiny fixture model (`name`: a file stem, see TINY_FIXTURES)."""
    path = FIXTURE_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"No fixture config {path}; add one to build a tiny {name} model.")
    return json.loads(path.read_text())


def vocab_tokenizer_dir(model_type: str, out: Path) -> Path:
    """The Hugging Face tokenizer of llama.cpp's vocabulary-only GGUF for `model_type` (VOCAB_GGUF)."""
    from transformers import AutoTokenizer

    from pipeline.llamacpp import require_converter

    name, eos = VOCAB_GGUF[model_type]
    tok = AutoTokenizer.from_pretrained(str(require_converter() / "models"), gguf_file=name)
    tok.eos_token = eos
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from pipeline.embedded import embedded_gguf

    gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def build_tiny_model(name: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Build a random float32 model from fixture `name` with transformers and save it to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = fixture_config(name)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Default init leaves norms at 1 and biases/D/dt_bias constant: perturb every 1-D parameter
        # so a swapped or ignored vector (e.g. a norm weight read as 1 + w) changes the logits.
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        if cfg["model_type"] in TOKENIZER_CLASS:
            tc = json.loads((out / "tokenizer_config.json").read_text())
            tc["tokenizer_class"] = TOKENIZER_CLASS[cfg["model_type"]]
            (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    # Hub form: the fixture file itself (rope_theta, mamba/attention), plus the dtype keys.
    hub = dict(cfg)
    hub.setdefault("architectures", list(model.config.architectures or []))
    hub["torch_dtype"] = "float32"
    hub["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    if tokenizer_dir is not None:
        warm_up(out, out)
    return out


# A few full-weight steps on the sample task's conversations (not the test rows' seed).
WARM_UP = {"steps": 12, "learning_rate": 1e-2, "batch": 8, "rows": 32, "seed": 123}


def warm_up(folder: Path, tokenizer_dir: Path) -> None:
    """Train every weight of the model in `folder` for a few steps (MLX, float32), in place.

    Why: a random model's next-token distribution is near-uniform (perplexity on the chat rows is
    ~the 49152-token vocabulary), and there any export meets a KL bound. A dozen Adam steps bring
    the perplexity to tens or hundreds. MLX rather than torch: transformers' Mamba2 runs its slow
    path on CPU (~3x slower here). The weights go back under their Hub names through the
    registry's `to_hf_weights` (phase 08's inverse of mlx-lm's renames), checked name by name.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    from pipeline import arch
    from pipeline.data.sample_task import generate_rows

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [tok.apply_chat_template(r["messages"], return_dict=False)
            for r in generate_rows(WARM_UP["rows"], seed=WARM_UP["seed"])]
    length = min(map(len, rows))
    model, config = load_model(folder)
    step = nn.value_and_grad(model, lambda m, x: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean())
    opt = optim.Adam(learning_rate=WARM_UP["learning_rate"])
    b = WARM_UP["batch"]
    for i in range(WARM_UP["steps"]):
        start = i * b % len(rows)
        _, grads = step(model, mx.array([r[:length] for r in rows[start:start + b]]))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    weights = arch.get(config["model_type"]).to_hf_weights(dict(tree_flatten(model.parameters())), config)
    path = folder / "model.safetensors"
    hub = mx.load(str(path))
    if set(weights) != set(hub) - ({"lm_head.weight"} if config.get("tie_word_embeddings", True) else set()):
        raise AssertionError(f"{folder.name}: to_hf_weights does not give back the Hub names: "
                             f"{sorted(set(weights) ^ set(hub))[:6]}")
    mx.save_safetensors(str(path), {k: weights.get(k, hub[k]).astype(hub[k].dtype) for k in hub},
                        metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, smollm2_tokenizer_dir):
    """Factory: `make(name) -> Path` of a tiny random HF model folder (cached per fixture name)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            model_type = fixture_config(name)["model_type"]
            tokenizer = smollm2_tokenizer_dir
            if model_type in VOCAB_GGUF:
                tokenizer = vocab_tokenizer_dir(model_type, tmp_path_factory.mktemp(f"tokenizer-{model_type}"))
            cache[name] = build_tiny_model(name, out, tokenizer)
        return cache[name]

    return make


@pytest.fixture(scope="session", params=TINY_FIXTURES)
def tiny_model_dir(request, tiny_hf_model) -> Path:
    """One tiny model folder per fixture (parametrised over all of them)."""
    return tiny_hf_model(request.param)


@pytest.fixture
def fresh_env() -> dict:
    return {}
