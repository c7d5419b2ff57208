"""Loading MLX models for training and evaluation, and the CPU form of a quantized model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import arch
from .errors import MissingInputError, PipelineError
from .runtime import compute_dtype, is_cpu


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingInputError(f"{path} not found: {model_dir} is not a model folder.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise PipelineError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:120]}).") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{path} is not a JSON object: not a model's config.")
    return config


def check_weight_files(model_dir: str | Path) -> None:
    """Validate every safetensors header before MLX reads the weights, so a damaged or hostile
    file is named instead of crashing native code; then the reference library opens it too."""
    from safetensors import safe_open

    from .untrusted.safetensors_header import check_safetensors

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MissingInputError(f"{model_dir} has no *.safetensors weights.")
    for f in files:
        check_safetensors(f)
        try:
            with safe_open(str(f), framework="numpy"):
                pass
        except Exception as e:  # safetensors raises its own error type for each defect
            raise PipelineError(
                f"{f} is damaged or truncated ({e}). Delete it and re-run the phase that wrote it."
            ) from None


def dequantize_layers(model: nn.Module, dtype) -> int:
    """Swap every quantized Linear/Embedding for a dense one holding its dequantized weights.

    The dense layer computes the same function as the quantized one (w = scale * q + bias),
    but at BLAS speed on the CPU backend, where quantized matmul is slow and inaccurate in
    bf16. Adapter parameter names are unchanged, so an adapter trained this way loads onto
    the genuinely quantized model. Returns the number of layers swapped.
    """
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # In float32: dequantizing in the scales' own bf16 would round w = scale * q + bias.
            biases = m.get("biases")
            w = mx.dequantize(m.weight, m.scales.astype(mx.float32),
                              None if biases is None else biases.astype(mx.float32),
                              m.group_size, m.bits, mode=m.mode).astype(dtype)
            if isinstance(m, nn.QuantizedLinear):
                dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                dense.weight = w
                if "bias" in m:
                    dense.bias = m.bias.astype(dtype)
            else:
                dense = nn.Embedding(w.shape[0], w.shape[1])
                dense.weight = w
            swaps.append((name, dense))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def cast_floats(model: nn.Module, dtype) -> None:
    """Cast floating-point parameters (not packed quantized ints) to the compute dtype."""
    params = tree_map(
        lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()
    )
    model.update(params)


def checked_config_overrides(model_dir: Path) -> dict:
    """Validate the folder's config and weight headers; return the config keys mlx-lm must be given
    instead (a folder that skipped phase 02 may carry a config form mlx-lm misreads)."""
    cfg = read_config(model_dir)
    check_weight_files(model_dir)
    normalised = dict(cfg)
    arch.normalise_config(normalised)
    return {k: v for k, v in normalised.items() if cfg.get(k) != v}


def load_model(model_dir: str | Path, dtype_choice: str = "auto", cpu_dequantize: bool = True):
    """Load an MLX/HF model folder with mlx-lm, in the compute dtype of this backend.

    On the CPU backend a quantized model is run through `dequantize_layers` (see there).
    Returns (model, tokenizer, config dict).
    """
    from mlx_lm.utils import load

    model_dir = Path(model_dir)
    overrides = checked_config_overrides(model_dir)
    try:
        model, tokenizer, config = load(str(model_dir), model_config=overrides, return_config=True)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise PipelineError(f"mlx-lm could not load {model_dir}: {e}") from None
    dtype = compute_dtype(dtype_choice)
    if cpu_dequantize and is_cpu():
        dequantize_layers(model, dtype)
    cast_floats(model, dtype)
    mx.eval(model.parameters())
    return model, tokenizer, config


def count_parameters(model: nn.Module) -> dict:
    """Total / trainable / frozen parameters, counting quantized weights at their true size.

    Every module's own arrays are counted (mlx-lm's get_total_parameters counts leaf modules
    only, which leaves out LoRA's A/B and Mamba's A_log, D, dt_bias); a quantized weight counts
    its unpacked size, its scales and biases (quantization parameters) not at all."""
    total = 0
    for _, m in model.named_modules():
        own = {k: v for k, v in m.items() if isinstance(v, mx.array) and not k.startswith("_")}  # as parameters()
        if hasattr(m, "bits") and "scales" in own:
            total += own["weight"].size * 32 // m.bits + (own["bias"].size if "bias" in own else 0)
        else:
            total += sum(v.size for v in own.values())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {
        "total": int(total),
        "trainable": int(trainable),
        "frozen": int(total - trainable),
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
    }


# --------------------------------------------------------------------------------------------
# Bounded memory: write a model tensor by tensor, run one block's weights at a time

_SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16",
    mx.float32: "F32", mx.float64: "F64",
}


WRITE_CACHE_BYTES = 128 << 20  # MLX's buffer cache while writing: two float32 layers of a 1 B model


def save_model_streamed(out_dir: str | Path, weights: dict, total_parameters: int, evaluate=None) -> dict:
    """Write lazy `weights` (mlx-lm's names) in mlx-lm's `save_model` layout (shards of at most
    MAX_FILE_SIZE_GB, model.safetensors.index.json), computing and writing one module at a time.

    `save_model` evaluates a whole shard (5 GB) before writing it; here each module's tensors are
    evaluated together (`evaluate(module_name, arrays, part, parts)`, default `mx.eval`; the caller
    may evaluate more with them, such as per-layer statistics), written, and dropped. A tensor may
    be given as `Rows` (blocks of rows): its module is then evaluated and written in `parts` steps,
    block `part` of each such tensor at a time. `weights` is consumed: the caller must hold no other
    reference to its arrays (drop the model), or they stay in memory.
    Returns the sha256 of each file written, by name.
    """
    from mlx_lm.utils import MAX_FILE_SIZE_GB, make_shards

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(v.nbytes for v in weights.values())
    shards = make_shards(weights, MAX_FILE_SIZE_GB)
    weights.clear()
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, hashes = {}, {}
    # Freed buffers are reused for the next module (fresh pages cost time) but not hoarded.
    previous = mx.set_cache_limit(WRITE_CACHE_BYTES)
    try:
        for i, name in enumerate(names):
            shard, shards[i] = shards[i], None
            weight_map.update(dict.fromkeys(shard, name))
            hashes[name] = _write_safetensors(out_dir / name, shard,
                                              evaluate or (lambda _, arrays, *__: mx.eval(arrays)))
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()
    index = {"metadata": {"total_size": total, "total_parameters": total_parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return hashes


def _write_safetensors(path: Path, tensors: dict, evaluate) -> str:
    """The header first (shapes and dtypes are known before evaluation), then each module's tensors.
    Returns the file's sha256, taken while writing."""

    groups: dict[str, list[str]] = {}
    for k in tensors:
        groups.setdefault(k.rpartition(".")[0], []).append(k)
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for k in (k for group in groups.values() for k in group):
        v = tensors[k]
        header[k] = {"dtype": _SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        writer = _Writer(f)
        try:
            writer.put([len(blob).to_bytes(8, "little") + blob])
            for module, group in groups.items():
                _write_module(writer, module, [tensors.pop(k) for k in group], evaluate)
        finally:
            writer.close()
    return writer.digest.hexdigest()


class Rows:
    """A 2-D+ tensor given as lazy blocks of its rows, evaluated and written one block at a time.

    A fused layer computed whole makes several float32 temporaries of the layer's size (67 MB each
    for a 1 B model's MLP), each in fresh pages; in blocks of a few MB they stay in MLX's cache and
    the CPU's: measured 2-3x faster per layer on the CPU backend (whole lazy concatenations are not:
    MLX then computes every block's temporaries before the first is freed)."""

    def __init__(self, blocks: list):
        self.blocks = list(blocks)
        first = self.blocks[0]
        self.dtype = first.dtype
        self.shape = (sum(b.shape[0] for b in self.blocks), *first.shape[1:])
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.size


def _write_module(writer: _Writer, module: str, arrays: list, evaluate) -> None:
    """Evaluate one module's tensors (block by block where they are `Rows`) and hand their bytes to
    the writer in file order: tensor by tensor, each tensor's blocks in row order. Blocks of a later
    tensor (quantization scales) wait until the tensors before it are written."""
    blocks = [a.blocks if isinstance(a, Rows) else [a] for a in arrays]
    parts = max(len(b) for b in blocks)
    done, current = [0] * len(arrays), 0
    for part in range(parts):
        now = [j for j, b in enumerate(blocks) if part < len(b)]
        evaluate(module, [blocks[j][part] for j in now], part, parts)
        for j in now:
            done[j] = part + 1
        while current < len(arrays):
            chunks = []
            for i in range(len(blocks[current])):
                if i < done[current] and blocks[current][i] is not None:
                    chunks.append(memoryview(mx.contiguous(blocks[current][i])))
                    blocks[current][i] = None  # the writer's view holds it until written
            if chunks:
                writer.put(chunks)
            if done[current] < len(blocks[current]):
                break
            current += 1


class _Writer:
    """Writes (and hashes) one module's bytes in a thread while the next module is computed:
    MLX's eval, file writes and sha256 all release the GIL. One module waits at most."""

    def __init__(self, f):
        import hashlib
        import queue
        import threading

        self.f, self.digest, self.error = f, hashlib.sha256(), None
        self.queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunks := self.queue.get()) is not None:
            if self.error is None:
                try:
                    for data in chunks:
                        self.digest.update(data)
                        self.f.write(data)
                except OSError as e:  # disk full: raised in the caller's thread
                    self.error = e

    def put(self, chunks: list) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunks)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def weight_arrays(m: nn.Module) -> dict:
    """A Linear/Embedding layer's weight arrays and quantization, as they are now (a later cast or
    update replaces them in the layer, not in this dict)."""
    out = {"weight": m.weight}
    if "scales" in m:
        out.update(scales=m.scales, biases=m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)
    return out


def dense_rows(w: dict, rows: slice):
    """Rows of a weight (`weight_arrays`) in float32; quantized ones dequantized (quantization runs along
    rows, so a slice of rows needs only its own groups)."""
    if "scales" not in w:
        return w["weight"][rows].astype(mx.float32)
    biases = w["biases"]
    return mx.dequantize(w["weight"][rows], w["scales"][rows].astype(mx.float32),
                         None if biases is None else biases[rows].astype(mx.float32),
                         group_size=w["group_size"], bits=w["bits"], mode=w["mode"])


# Weights turned into float32 at a time by a streamed forward pass (rows x input width): a few MB
# stay in cache and in MLX's reused buffers (measured ~1.4x faster per layer than whole 8192-row blocks).
STREAM_ELEMENTS = 1 << 20


def block_rows(width: int, elements: int) -> int:
    """Rows per block of at most `elements` weights (at least one row; a multiple of 8 when larger)."""
    rows = max(1, elements // max(width, 1))
    return rows - rows % 8 if rows > 8 else rows


def load_streamed(model_dir: str | Path, adapters: str | Path | None = None) -> nn.Module:
    """A model (optionally with its adapter) for one `forward_streamed` pass in float32, loaded lazily:
    weights are read from disk when their decoder block runs and dropped after it, and linear layers
    turn their stored weights (bf16, or quantized) into float32 one layer at a time. Memory: about
    one block in its stored form plus one layer in float32, whatever the model's size."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_load_model

    model_dir = Path(model_dir)
    overrides = checked_config_overrides(model_dir)
    try:
        model, _ = mlx_load_model(model_dir, lazy=True, model_config=overrides)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise PipelineError(f"mlx-lm could not load {model_dir}: {e}") from None
    if adapters is not None:
        load_adapters(model, str(adapters))
    model.eval()
    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            _swap_class(m, {"__call__": _linear_float32})
        elif isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            _swap_class(m, {"__call__": _embedding_float32, "as_linear": _linear_float32})
        else:  # norms, adapters, and layers of other kinds: their own arrays, in float32
            own = {k: v.astype(mx.float32) for k, v in m.items()
                   if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)}
            m.update(own)
    for block in model.layers:
        _swap_class(block, {"__call__": _run_then_drop})
    return model


def forward_streamed(model: nn.Module, rows: list[list[int]]):
    """Float32 logits (batch, longest row, vocabulary) of `rows` in one pass through a `load_streamed`
    model, which it uses up (each block's weights are dropped after it ran). Rows are padded at the
    end: a causal model's logits at a row's own positions do not depend on what follows them."""
    width = max(len(r) for r in rows)
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
    logits = model(tokens).astype(mx.float32)
    mx.eval(logits)
    return logits


_SWAPPED: dict = {}


def _swap_class(m: nn.Module, methods: dict) -> None:
    """Give one module instance other methods (its class's subclass): what it holds stays as it is."""
    cls = type(m)
    key = (cls, tuple(sorted(methods)), tuple(methods.values()))
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"Streamed{cls.__name__}", (cls,), dict(methods))
    m.__class__ = _SWAPPED[key]


def _linear_float32(self, x):
    w, n = weight_arrays(self), self.weight.shape[0]
    x = x.astype(mx.float32)
    step = block_rows(x.shape[-1], STREAM_ELEMENTS)
    parts = []
    for start in range(0, n, step):
        parts.append(x @ dense_rows(w, slice(start, start + step)).T)
        mx.eval(parts[-1])  # one weight (slice) in float32 at a time, not a block's worth
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    return y + self.bias.astype(mx.float32) if "bias" in self else y


def _embedding_float32(self, x):
    if "scales" not in self:
        return self.weight[x].astype(mx.float32)
    biases = self.get("biases")
    return mx.dequantize(self.weight[x], self.scales[x].astype(mx.float32),
                         None if biases is None else biases[x].astype(mx.float32),
                         group_size=self.group_size, bits=self.bits, mode=self.mode)


def _run_then_drop(self, *args, **kwargs):
    out = type(self).__mro__[1].__call__(self, *args, **kwargs)
    mx.eval(out)
    self.update(tree_map(lambda _: mx.array([]), self.parameters()))  # used once: free its weights
    mx.clear_cache()  # and give their buffers back (MLX keeps freed buffers for reuse)
    return out
