"""03 Quantize the base with MLX affine quantization (mlx-lm's convert): the QLoRA training base.

Each group of `group_size` weights along a row stores `bits`-bit integers plus one scale and
one bias: w = scale * q + bias. Bits per weight = bits + 2 * (scale bits) / group_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import PipelineError
from ..fsio import atomic_path, dir_size, hash_model_dir, human_size, is_disk_full, safetensors_numel
from ..manifest import read_manifest, write_manifest
from ..modeling import check_weight_files
from ..paths import RunPaths
from .common import done, start_phase


@dataclass
class QuantizeResult:
    path: Path
    size_before: int
    size_after: int
    bits_per_weight: float


def quantize_base_model(cfg) -> QuantizeResult:
    from mlx_lm.convert import convert

    started = start_phase(cfg, "03 quantize base model", ["quantize"])
    paths = RunPaths(cfg)
    base_manifest = read_manifest(paths.base, "base")
    out = paths.quantized
    q = cfg.quantize
    check_weight_files(paths.base)
    # Upper bound: bits per weight plus a scale and a bias per group, at most 32-bit each.
    expected = int(safetensors_numel(paths.base) * (q.bits + 64 / q.group_size) / 8)
    with atomic_path(out, expected_bytes=expected, what=f"the {q.bits}-bit quantized model") as tmp:
        # convert() refuses an existing folder, so it writes a fresh one inside our temporary.
        target = tmp / "model"
        try:
            convert(str(paths.base), str(target), quantize=True, q_group_size=q.group_size, q_bits=q.bits)
        except (ValueError, RuntimeError, OSError) as e:
            if is_disk_full(e):
                raise  # atomic_path names the path and the shortfall
            raise PipelineError(
                f"mlx-lm could not quantize {paths.base}: {e}. If a weight file is damaged, "
                "delete the folder and run `make base` again."
            ) from None
        for f in target.iterdir():
            f.rename(tmp / f.name)
        target.rmdir()
        bpw = _bits_per_weight(tmp)
        size_before = dir_size(paths.base, "*.safetensors")
        size_after = dir_size(tmp, "*.safetensors")
        write_manifest(
            tmp, "03_quantize_base_model", cfg, started,
            inputs={"base": str(paths.base), "base_content_hash": base_manifest["outputs"]["content_hash"]},
            outputs={"path": str(out), "content_hash": hash_model_dir(tmp), "size_bytes": size_after},
            quantization={"bits": q.bits, "group_size": q.group_size, "mode": "affine"},
            report={"size_before": size_before, "size_after": size_after, "bits_per_weight": bpw},
        )
    click.echo(
        f"size: {human_size(size_before)} -> {human_size(size_after)} "
        f"({size_after / max(size_before, 1):.1%}); {bpw:.2f} bits per weight "
        f"({q.bits}-bit values + one scale and one bias per {q.group_size} weights, in the model's float "
        "dtype: 16-bit for bf16/fp16 bases; "
        "norms and layers whose rows don't divide into groups stay unquantized)"
    )
    done(f"quantized base ready: {out}")
    return QuantizeResult(out, size_before, size_after, bpw)


def _bits_per_weight(model_dir: Path) -> float:
    from mlx_lm.utils import compute_bits_per_weight, load_model

    model, _ = load_model(model_dir, lazy=True)
    return round(float(compute_bits_per_weight(model)), 3)

