"""Shared test fixtures: the SmolLM2 tokenizer and tiny random models, built once per session.

- `smollm2_tokenizer_dir`: the SmolLM2 tokenizer (from the embedded GGUF) saved as a Hugging Face
  tokenizer folder. Nothing is downloaded.
- `tiny_hf_model`: a factory `make(model_type) -> Path` building a tiny random model with real
  transformers from `tests/fixtures/configs/<model_type>.json` (hidden 64, 2-4 layers, the SmolLM2
  vocabulary), cached per type. The folder holds safetensors weights, the tokenizer and a
  config.json in the Hub form (top-level `rope_theta`, granitemoehybrid `layer_types` as
  mamba/attention): transformers 5 `save_pretrained` writes `rope_parameters` and renamed layer
  types, which mlx-lm 0.32 rejects or misreads (PLATFORM_NOTES.md), so the fixture file is written
  back over it. Both mlx-lm and transformers load every such folder.
- `fresh_env`: an empty environment for `load_config(..., env=...)`, so the developer's shell
  (LORA_RANK, TEST_MODE, ...) cannot leak into config tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
# Trained/fused tiny runs shared by the export tests (phases 07-10), registered here once.
from export_fixtures import export_runs  # noqa: F401
from shipped_fixtures import shipped_run  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_CONFIGS = FIXTURES / "configs"
TINY_MODEL_TYPES = sorted(p.stem for p in FIXTURE_CONFIGS.glob("*.json"))


def fixture_config(model_type: str) -> dict:
    """The Hub-style config.json of a tiny fixture model."""
    path = FIXTURE_CONFIGS / f"{model_type}.json"
    if not path.is_file():
        raise FileNotFoundError(f"No fixture config {path}; add one to build a tiny {model_type} model.")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from pipeline.embedded import embedded_gguf

    gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def build_tiny_model(model_type: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Build a random float32 model of `model_type` with transformers and save it to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = fixture_config(model_type)
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
    # Hub form: the fixture file itself (rope_theta, mamba/attention), plus the dtype keys.
    hub = dict(cfg)
    hub.setdefault("architectures", list(model.config.architectures or []))
    hub["torch_dtype"] = "float32"
    hub["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, smollm2_tokenizer_dir):
    """Factory: `make(model_type) -> Path` of a tiny random HF model folder (cached per type)."""
    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[model_type] = build_tiny_model(model_type, out, smollm2_tokenizer_dir)
        return cache[model_type]

    return make


@pytest.fixture(scope="session", params=TINY_MODEL_TYPES)
def tiny_model_dir(request, tiny_hf_model) -> Path:
    """One tiny model folder per fixture architecture (parametrised over all of them)."""
    return tiny_hf_model(request.param)


@pytest.fixture
def fresh_env() -> dict:
    return {}
