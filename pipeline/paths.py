"""Where each phase of a run writes: models/<run>/<phase output>/."""

from __future__ import annotations

from pathlib import Path


class RunPaths:
    """`variant` names a second fuse of the same adapter (fused-<variant>/, hf-<variant>/), e.g.
    the --no-dequantize fuse the native GGUF is transcoded from while fused/ is de-quantized."""

    def __init__(self, cfg, variant: str | None = None):
        self.root = Path(cfg.output_dir) / cfg.run
        self.cfg = cfg
        self.suffix = f"-{variant}" if variant else ""

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def quantized(self) -> Path:
        return self.root / "base-quantized"

    @property
    def train_base(self) -> Path:
        """The model training runs on: the quantized base for QLoRA, else the full base."""
        return self.quantized if self.cfg.quantize.enabled else self.base

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def fused(self) -> Path:
        return self.root / f"fused{self.suffix}"

    @property
    def hf(self) -> Path:
        return self.root / f"hf{self.suffix}"

    @property
    def imatrix(self) -> Path:
        return self.root / "imatrix"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    @property
    def verify(self) -> Path:
        return self.root / "verify"
