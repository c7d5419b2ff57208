"""Where each phase of a run writes: models/<run>/<phase output>/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingInputError, PipelineError
from .fsio import check_not_inside, sha256_file

BEST = "best"  # adapters/best/: the adapter of the lowest validation loss (train.keep_best)
ADAPTER_FILE = "adapters.safetensors"


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter 05-10 load: `kind` "best" (adapters/best/, the lowest validation loss) or "last"
    (adapters/, the last step's). `source` is the training output folder (its manifest is there)."""

    kind: str
    folder: Path
    source: Path
    step: int | None = None
    val_loss: float | None = None
    why: str = ""  # why the last step's: "--adapter last", or no best/

    @property
    def file(self) -> Path:
        return self.folder / ADAPTER_FILE

    @property
    def label(self) -> str:
        """The folder as a table names it: adapters/ or adapters/best/."""
        return f"{self.source.name}/{BEST}/" if self.folder != self.source else f"{self.folder.name}/"

    def describe(self) -> str:
        """The banner line: which adapter, from where."""
        if self.kind == BEST:
            at = ", ".join(a for a in (f"step {self.step}" if self.step is not None else "",
                                       f"val loss {self.val_loss:.3f}" if self.val_loss is not None else "") if a)
            return f"adapter: best{f' ({at})' if at else ''} from {self.folder}/"
        return f"adapter: last step ({self.why}) from {self.folder}/"

    def record(self) -> dict:
        """What a phase's manifest records about the adapter it used (its top-level `adapter` key).
        "folder", not "path": a {"path", "sha256"} record in outputs is a file the manifest vouches for."""
        out = {"adapter": self.kind, "folder": str(self.folder)}
        if self.kind == BEST:
            out.update(step=self.step, val_loss=self.val_loss)
        out["sha256"] = sha256_file(self.file) if self.file.is_file() else None
        return out


def choose_adapter(adapters: Path, wanted: str) -> AdapterChoice:
    """`adapters`: a training output folder (adapters.safetensors, maybe best/), or a best/ folder
    itself (the guides' path form). `wanted`: the config's `adapter`, best or last."""
    adapters = Path(adapters)
    if adapters.name == BEST and (adapters / "best.json").is_file():  # named directly: that one, whatever wanted
        return _best(adapters, adapters.parent)
    if wanted == BEST and (adapters / BEST / ADAPTER_FILE).is_file():
        return _best(adapters / BEST, adapters)
    if wanted != BEST:
        why = "chosen with --adapter last / ADAPTER=last"
    elif (adapters / BEST).is_dir():
        why = f"{adapters.name}/{BEST}/ has no {ADAPTER_FILE}"
    else:
        why = f"no {adapters.name}/{BEST}/: trained with train.keep_best off"
    return AdapterChoice("last", adapters, adapters, why=why)


def _best(folder: Path, source: Path) -> AdapterChoice:
    try:
        info = json.loads((folder / "best.json").read_text())
    except (OSError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    step, loss = info.get("step"), info.get("val_loss")
    return AdapterChoice(BEST, folder, source, step if isinstance(step, int) else None,
                         loss if isinstance(loss, (int, float)) else None)


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
        """The training output (04 writes there; its manifest is read there)."""
        return self.root / "adapters"

    @property
    def adapter_choice(self) -> AdapterChoice:
        """Which adapter 05-10 use (config `adapter`: best or last), and why."""
        return choose_adapter(self.adapters, getattr(self.cfg, "adapter", BEST))

    @property
    def adapter(self) -> Path:
        """The folder 05-10 load the adapter from: adapters/best/ when the config says best and
        training kept one, else adapters/."""
        return self.adapter_choice.folder

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
        data = self.adapter_choice.source.parent / "data" if "adapters" in self.given else None
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
