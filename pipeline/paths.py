"""Where each phase of a run writes: models/<run>/<phase output>/."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MissingInputError, PipelineError
from .fsio import check_not_inside


class RunPaths:
    """`variant` names a second fuse of the same adapter (fused-<variant>/, hf-<variant>/), e.g.
    the --no-dequantize fuse the native GGUF is transcoded from while fused/ is de-quantized."""

    def __init__(self, cfg, variant: str | None = None):
        self.root = Path(cfg.models_dir) / cfg.run
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


class GivenPaths(RunPaths):
    """Plain paths as the guides write them (`07_fuse_lora.py --base-model M --adapter-path A
    --output-dir O`), in place of a run folder. The phase reads and writes only what was named;
    `data` is the adapter's own run's data/ when it has one (survival rows), else None."""

    def __init__(self, cfg, *, base: Path | None = None, adapters: Path | None = None,
                 fused: Path | None = None, hf: Path | None = None):
        super().__init__(cfg)
        self.given = {k: Path(v) for k, v in dict(base=base, adapters=adapters, fused=fused, hf=hf).items() if v}

    def _named(self, what: str) -> Path:
        if what not in self.given:
            raise AttributeError(f"no {what} path was given")
        return self.given[what]

    base = quantized = train_base = property(lambda self: self._named("base"))
    adapters = property(lambda self: self._named("adapters"))
    fused = property(lambda self: self._named("fused"))
    hf = property(lambda self: self._named("hf"))

    @property
    def data(self) -> Path | None:
        data = self.given["adapters"].parent / "data" if "adapters" in self.given else None
        return data if data is not None and (data / "valid.jsonl").is_file() else None


def check_given_output(out: Path, inputs: dict, phase: str) -> None:
    """A named output may replace only what this phase wrote before: never one of its inputs (or a
    folder holding one), never a folder of the user's own files."""
    for what, path in inputs.items():
        if path is not None:
            try:
                check_not_inside(out, path, what)
            except PipelineError as e:
                raise PipelineError(str(e).replace("set MODELS_DIR (--models-dir) to", "choose")) from None
    if out.is_file():
        raise PipelineError(f"{out} is a file; the output must be a folder. Choose another output path.")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            ours = json.loads(manifest.read_text()).get("phase") == phase
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise PipelineError(
                f"{out} already exists and holds files this phase did not write (no {phase} manifest.json). "
                "Nothing was changed; choose a new output folder, or delete that one yourself.")


def require_folder(path: Path, flag: str) -> Path:
    """An input named on the command line must be an existing folder."""
    if not Path(path).is_dir():
        raise MissingInputError(f"{flag} {path}: no such folder.")
    return Path(path)
