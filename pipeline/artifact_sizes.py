"""What is in a model artifact, by category, from file headers only (`mlx-pipeline inspect`).

An artifact is a model folder (MLX or Hugging Face: config.json + *.safetensors), an adapter folder
(adapters.safetensors + adapter_config.json), a training checkpoint (the same plus
optimizer.safetensors), a single .safetensors file, or a GGUF file. Every tensor is put in one
category by its name (CATEGORY_RULES, one table for every architecture in pipeline/arch/ and for
llama.cpp's GGUF names); the bytes of all the artifact's files are counted, what is not tensor data
(headers, JSON, tokenizer files) going to "metadata", so the categories add up to the bytes on disk.

MLX-quantized weights (uint32-packed, with `.scales` / `.biases` beside them) are counted unpacked
(elements x 32 / bits) and their scales and biases go into the weight's category, so bits per
weight (bytes x 8 / parameters) is what the weight really costs: 4.5 for 4-bit, group 64, with
bfloat16 scales and biases. No tensor data is read: the safetensors JSON header and the GGUF header
(both validated by pipeline/untrusted first, so a damaged file is named rather than misread).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MissingInputError, PipelineError
from .untrusted.gguf_header import check_gguf
from .untrusted.safetensors_header import DTYPE_BITS, read_header

CATEGORIES = ["embeddings", "attention", "mlp", "ssm", "experts", "norms", "head", "lora", "optimizer", "other",
              "metadata"]
LABELS = {"embeddings": "embeddings", "attention": "attention", "mlp": "MLP", "ssm": "Mamba/SSM",
          "experts": "experts", "norms": "norms", "head": "head", "lora": "LoRA", "optimizer": "optimizer state",
          "other": "other tensors", "metadata": "metadata"}
WEIGHT_CATEGORIES = ["embeddings", "attention", "mlp", "ssm", "experts", "norms", "head", "other"]

# Tensor name -> category, first match wins. MLX and Hugging Face names (llama, mistral, qwen2/3, phi3,
# granite, granitemoehybrid, gemma3_text) and llama.cpp's GGUF names (token_embd, blk.N.attn_*, ffn_*,
# ssm_*, ffn_*_exps, output_norm, output). Order matters: LoRA before the layer it adapts, experts
# (and their router) before MLP, norms before attention/SSM (q_norm, mamba.norm, ssm_norm are norms).
CATEGORY_RULES: list[tuple[str, str]] = [
    # LoRA A/B (MLX `.lora_a`, PEFT `.lora_A.weight`, GGUF `.weight.lora_a`), DoRA's magnitude `.m`
    (r"(^|\.)lora_[abAB](\.|$)|(^|\.)lora_magnitude|_proj\.m$|_linear\.m$", "lora"),
    # experts: MLX SwitchGLU, HF per-expert / fused expert weights, routers; GGUF *_exps, ffn_gate_inp
    (r"switch_mlp|\.experts?\.|block_sparse_moe\.(input_linear|output_linear|router|gate)\b|\.mlp\.gate\.|"
     r"\.router\.|_exps?\.|(^|\.)ffn_gate_inp(_shexp)?\.|exp_probs_b", "experts"),
    (r"(^|\.)[a-z_]*(norm|layernorm|ln_f|ln_\d)(\.|$)", "norms"),
    (r"embed_tokens|(^|\.)wte\.|(^|\.)token_embd(_norm)?\.|word_embeddings|(^|\.)embeddings?\.", "embeddings"),
    (r"(^|\.)lm_head\.|^output\.", "head"),
    (r"self_attn|\.attention\.|\.attn\.|(^|\.)attn_|\.(q|k|v|o|qkv)_proj\.", "attention"),
    (r"\.mamba\.|\.mixer\.|(^|\.)ssm_", "ssm"),
    (r"\.mlp\.|shared_mlp|shared_expert|feed_forward|(^|\.)ffn_|\.(gate|up|down|gate_up)_proj\.", "mlp"),
]
_RULES = [(re.compile(p), c) for p, c in CATEGORY_RULES]

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
OPTIMIZER_FILE, ADAPTER_FILE, ADAPTER_CONFIG = "optimizer.safetensors", "adapters.safetensors", "adapter_config.json"
ADAPTER_FILES = (ADAPTER_FILE, "adapter_model.safetensors")  # mlx-lm's, PEFT's
NOT_AN_ARTIFACT_FIX = ("Give a model folder (config.json + *.safetensors, e.g. models/<run>/fused), an adapter "
                       "folder (adapters.safetensors + adapter_config.json, e.g. models/<run>/adapters/best), a "
                       "training checkpoint (models/<run>/adapters/checkpoints/step-N), a .safetensors file or "
                       "a .gguf file.")


def category_of(name: str) -> str:
    """The category of a tensor name (CATEGORY_RULES); "other" when no rule matches (rotary tables, ...)."""
    for pattern, category in _RULES:
        if pattern.search(name):
            return category
    return "other"


@dataclass
class Category:
    params: int = 0
    bytes: int = 0
    tensors: int = 0
    dtypes: Counter = field(default_factory=Counter)  # storage label -> bytes
    trainable: str = ""  # "trainable", "state" (optimizer), or "" when not known

    @property
    def bits_per_weight(self) -> float | None:
        return self.bytes * 8 / self.params if self.params else None

    def dtype_text(self) -> str:
        return " + ".join(d for d, _ in self.dtypes.most_common())

    def add(self, params: int, nbytes: int, dtype: str, trainable: str = "") -> None:
        self.params += params
        self.bytes += nbytes
        self.tensors += 1
        self.dtypes[dtype] += nbytes
        self.trainable = self.trainable or trainable


@dataclass
class Artifact:
    path: Path
    kind: str  # "model", "adapter", "checkpoint", "gguf", "gguf-adapter", "safetensors"
    description: str
    categories: dict[str, Category]
    files: dict[str, int]  # file name -> bytes on disk
    metadata_files: dict[str, int]  # what the metadata category holds, per file
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # config.json (models), adapter_config.json (adapters)
    quantization: dict | None = None
    tied_embeddings: bool | None = None
    step: int | None = None  # a checkpoint's training step
    moments: tuple[int, int] = (0, 0)  # optimizer values: (Adam's m and v, its scalars: step, learning rate)

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.categories.values())

    @property
    def total_params(self) -> int:
        return sum(c.params for k, c in self.categories.items() if k != "optimizer")

    def weights(self) -> Category:
        """The model's own weights together (LoRA, optimizer state and metadata left out)."""
        out = Category()
        for k in WEIGHT_CATEGORIES:
            c = self.categories.get(k)
            if c:
                out.params, out.bytes, out.tensors = out.params + c.params, out.bytes + c.bytes, out.tensors + c.tensors
                out.dtypes.update(c.dtypes)
        return out

    def trainable_params(self) -> int:
        return sum(c.params for k, c in self.categories.items() if c.trainable == "trainable")

    def to_json(self) -> dict:
        cats = {k: {"params": c.params, "bytes": c.bytes, "tensors": c.tensors, "dtype": c.dtype_text(),
                    "bits_per_weight": _round(c.bits_per_weight), "trainable": c.trainable or None}
                for k, c in self.categories.items()}
        w = self.weights()
        return {"path": str(self.path), "kind": self.kind, "description": self.description,
                "file_bytes": self.file_bytes, "total_bytes": self.total_bytes, "total_params": self.total_params,
                "trainable_params": self.trainable_params(), "weights_bits_per_weight": _round(w.bits_per_weight),
                "optimizer_values": {"moments": self.moments[0], "scalars": self.moments[1]},
                "tied_embeddings": self.tied_embeddings, "quantization": self.quantization, "step": self.step,
                "categories": cats, "files": self.files, "metadata_files": self.metadata_files, "notes": self.notes}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# --- reading ------------------------------------------------------------------------------------


def artifact_files(path: Path) -> tuple[list[Path], list[str]]:
    """The files an artifact is made of (a file, or a folder's top-level files) and the sub-folders
    left out (best/, checkpoints/: artifacts of their own, inspected on their own)."""
    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise MissingInputError(f"{path}: no such file or folder. {NOT_AN_ARTIFACT_FIX}")
    entries = sorted(path.iterdir())
    return [p for p in entries if p.is_file()], [p.name + "/" for p in entries if p.is_dir()]


def inspect_artifact(path: str | Path, progress: bool = True, progress_delay: float = 0.5) -> Artifact:
    """Categorise every tensor of the artifact at `path` from its headers (see the module docstring).
    The progress bar appears only when reading takes longer than `progress_delay` seconds."""
    from tqdm import tqdm

    path = Path(path)
    files, subfolders = artifact_files(path)
    tensor_files = [f for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
    if not tensor_files:
        what = "file" if path.is_file() else "folder"
        raise PipelineError(f"{path}: this {what} holds no .safetensors or .gguf file, so it is not a model, "
                            f"adapter, checkpoint or GGUF. {NOT_AN_ARTIFACT_FIX}")
    names = {f.name for f in files}
    if path.is_dir() and not names & {"config.json", ADAPTER_CONFIG, OPTIMIZER_FILE} and not _gguf_split(tensor_files):
        listed = ", ".join(f.name for f in tensor_files[:3]) + (", ..." if len(tensor_files) > 3 else "")
        raise PipelineError(f"{path}: unknown folder: it has no config.json (a model), {ADAPTER_CONFIG} (an "
                            f"adapter) or {OPTIMIZER_FILE} (a training checkpoint), and its tensor files ({listed}) "
                            f"are not the parts of one split GGUF. Inspect one file, e.g. `mlx-pipeline inspect "
                            f"{tensor_files[0]}`, or the folder that holds the whole model.")
    config = _json(path / "config.json") if path.is_dir() else {}
    adapter_config = _json(path / ADAPTER_CONFIG) if path.is_dir() else {}
    categories = {k: Category() for k in CATEGORIES}
    metadata = {}
    # A single file of a quantized model: its folder's config.json says the bits and group size
    # (the shapes alone cannot tell 4-bit group 64 from 8-bit group 32).
    quantization = _quantization(config if path.is_dir() else _json(path.parent / "config.json"))
    moments = [0, 0]
    general: dict = {}
    # Headers are read quickly, but a folder of many shards (or a slow disk) still takes a while.
    bar = tqdm(tensor_files, desc="reading headers", unit="file", delay=progress_delay,
               disable=not progress or len(tensor_files) < 2)
    for f in bar:
        if f.name.endswith(".gguf"):
            summary = check_gguf(f)
            general = general or summary["general"]
            tensor_bytes = _add_gguf(summary, categories)
        else:
            role = ("optimizer" if f.name == OPTIMIZER_FILE else "adapter" if f.name in ADAPTER_FILES
                    else "model")
            full = adapter_config.get("fine_tune_type") == "full"
            tensor_bytes = _add_safetensors(f, role, quantization, categories, moments, full)
        metadata[f.name] = f.stat().st_size - tensor_bytes
    for f in files:
        if not f.name.endswith(WEIGHT_SUFFIXES):
            metadata[f.name] = f.stat().st_size
    meta = categories["metadata"]
    meta.params, meta.bytes = 0, sum(metadata.values())
    meta.dtypes["headers, JSON, tokenizer"] = meta.bytes
    categories = {k: c for k, c in categories.items() if c.bytes or c.params}
    kind, description, step = _describe(path, names, config, adapter_config, general, quantization, categories)
    art = Artifact(path, kind, description, categories, {f.name: f.stat().st_size for f in files},
                   {k: v for k, v in sorted(metadata.items(), key=lambda kv: -kv[1]) if v},
                   config=adapter_config or config, quantization=quantization, step=step)
    art.moments = tuple(moments)
    art.tied_embeddings = _tied(config, categories, kind)
    if subfolders:
        art.notes.append(f"not counted (artifacts of their own, inspect them separately): {', '.join(subfolders)}")
    if art.tied_embeddings:
        art.notes.append("tied embeddings: no separate lm_head, the output layer reuses the embedding matrix")
    return art


def _gguf_split(files: list[Path]) -> bool:
    """True for the parts of one split GGUF (NAME-00001-of-00003.gguf, ...): one model in several files."""
    parts = [re.fullmatch(r"(.+)-\d{5}-of-(\d{5})\.gguf", f.name) for f in files]
    return all(parts) and len({(m.group(1), m.group(2)) for m in parts}) == 1


def _json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _quantization(config: dict) -> dict | None:
    q = config.get("quantization") or config.get("quantization_config")
    return q if isinstance(q, dict) and "bits" in q else None


def _add_safetensors(f: Path, role: str, quantization: dict | None, categories: dict, moments: list,
                     full: bool) -> int:
    header, _ = read_header(f)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    total = 0
    for name, info in tensors.items():
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        total += nbytes
        stem, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and tensors.get(stem + ".weight", {}).get("dtype") in ("U32", "U8"):
            continue  # counted with its packed weight below
        numel = _numel(info["shape"])
        dtype = info["dtype"]
        if role == "optimizer":
            moments[0 if leaf in ("m", "v") else 1] += numel
            categories["optimizer"].add(numel, nbytes, dtype, "state")
            continue
        if leaf == "weight" and dtype in ("U32", "U8") and stem + ".scales" in tensors:
            extra = sum(_span(tensors[stem + s]) for s in (".scales", ".biases") if stem + s in tensors)
            bits, group, mode = _layer_quantization(quantization, stem, info, tensors[stem + ".scales"])
            numel = numel * DTYPE_BITS[dtype] // bits
            nbytes += extra
            dtype = f"{bits}-bit {mode} g{group}"
        category = category_of(name)
        trainable = "trainable" if role == "adapter" and (full or category == "lora") else ""
        if role == "adapter" and not full and category != "lora":
            category = "lora"  # an adapter file holds only what was trained: LoRA/DoRA tensors
        categories[category].add(numel, nbytes, dtype, trainable)
    return total


def _span(info: dict) -> int:
    return info["data_offsets"][1] - info["data_offsets"][0]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layer_quantization(q: dict | None, stem: str, weight: dict, scales: dict) -> tuple[int, int, str]:
    """(bits, group size, mode) of one quantized layer: config.json's (a per-layer entry wins), else
    inferred from the shapes assuming mlx's default group size 64."""
    layer = (q or {}).get(stem) if isinstance((q or {}).get(stem), dict) else q
    if layer and "bits" in layer:
        return int(layer["bits"]), int(layer.get("group_size", 64)), str(layer.get("mode", "affine"))
    group = 64
    in_features = scales["shape"][-1] * group
    bits = weight["shape"][-1] * DTYPE_BITS[weight["dtype"]] // max(in_features, 1)
    return max(bits, 1), group, "affine"


def _add_gguf(summary: dict, categories: dict) -> int:
    from gguf.constants import GGMLQuantizationType

    adapter = summary["general"].get("general.type") == "adapter"
    for name, gtype, elements, nbytes in summary["tensors"]:
        try:
            dtype = GGMLQuantizationType(gtype).name
        except ValueError:
            dtype = f"ggml type {gtype}"
        category = category_of(name)
        categories[category].add(elements, nbytes, dtype, "trainable" if adapter and category == "lora" else "")
    return summary["tensor_data_bytes"]


def _tied(config: dict, categories: dict, kind: str) -> bool | None:
    """True when the model has embeddings but no separate output layer (tie_word_embeddings)."""
    if kind not in ("model", "gguf") or "embeddings" not in categories:
        return None
    if "head" in categories:
        return False
    return bool(config.get("tie_word_embeddings", True)) if config else True


def _describe(path: Path, names: set, config: dict, adapter_config: dict, general: dict, q: dict | None,
              categories: dict) -> tuple[str, str, int | None]:
    """(kind, one-line description, training step of a checkpoint)."""
    quant = f", {q['bits']}-bit {q.get('mode', 'affine')} quantized (group {q.get('group_size', 64)})" if q else ""
    if general:
        if general.get("general.type") == "adapter":
            return "gguf-adapter", f"GGUF LoRA adapter ({general.get('general.architecture')})", None
        main = categories.get("attention") or categories.get("mlp") or categories.get("embeddings")
        weights = f"{main.dtype_text()} weights" if main else "no weights: a vocabulary-only file"
        return "gguf", f"GGUF model ({general.get('general.architecture')}, {weights})", None
    tune = adapter_config.get("fine_tune_type", "lora")
    lora = adapter_config.get("lora_parameters") or {}
    detail = (f"{tune}, rank {lora.get('rank')}, {len(lora.get('keys') or [])} target projections, "
              f"last {adapter_config.get('num_layers')} layers" if tune != "full" and lora else tune)
    if "peft_type" in adapter_config:  # a Hugging Face PEFT adapter
        detail = f"PEFT {adapter_config['peft_type']}, rank {adapter_config.get('r')}"
    if OPTIMIZER_FILE in names:
        state = _json(path / "state.json")
        step = state.get("step") if isinstance(state.get("step"), int) else None
        return ("checkpoint", f"training checkpoint{f' (step {step})' if step is not None else ''}: "
                f"adapter weights + Adam optimizer state ({detail})", step)
    if names & set(ADAPTER_FILES):
        return "adapter", f"adapter ({detail})", None
    if config:
        manifest = _json(path / "manifest.json")
        phase = manifest.get("phase", "")
        made_by = {"02_fetch_base_model": "base model (02)", "03_quantize_base_model": "quantized base (03)",
                   "08_convert_to_hf": "Hugging Face export (08)"}.get(phase, "")
        if phase == "07_fuse_lora":
            made_by = "fused model (07 --de-quantize)" if manifest.get("dequantized") else \
                "fused model (07 --no-dequantize)"
        arch = config.get("model_type", "?")
        return "model", f"{made_by or 'model'}: {arch}{quant}", None
    if path.is_file():
        return "safetensors", f"safetensors file{quant}", None
    return "model", f"model folder without config.json{quant}", None
