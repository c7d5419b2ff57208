"""Every kind of GGUF file phase 09 writes, in one table: what it is made from, how, and what 10
verify compares it with.

09 records each file's kind (and the key `--type` matches) in gguf/manifest.json
(outputs.files.<key>.kind); 10 verify, export_choice and 11 install read it from there, never
from file names. Adding a kind: a row in KINDS, the code in 09 that writes the file and records
it with `entry(...)`; verify then measures it against its `reference` (see CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PipelineError
from .fsio import sha256_file

FUSED = "fused"  # the fused MLX model (fused/), float32
TRAINED = "trained"  # the training base + adapter in MLX, float32: what training optimised


@dataclass(frozen=True)
class Kind:
    name: str
    made_from: str
    how: str
    reference: str  # FUSED or TRAINED
    pairs_with_lora: bool = False  # a base GGUF, measured with the run's LoRA GGUF applied
    standalone: bool = True  # False: not a model by itself (the LoRA GGUF): measured only in its pairs
    unquantized: bool = False  # its KL to the reference must stay under verify.f16_max_kl

    def made_by(self, fused_manifest: dict) -> str:
        """The 'made by' column of verify's table."""
        if self.reference == TRAINED:
            return self.how
        if self.name == NATIVE_FUSE.name:
            return self.how
        dequantized = fused_manifest.get("dequantized")
        fuse = ("fuse --rebase" if fused_manifest.get("rebased") else "fuse --de-quantize" if dequantized
                else "fuse --no-dequantize" if dequantized is False else "fused/")
        return fuse + (" + imatrix" if self.name == IMATRIX.name else "")


CONVERTER = Kind("converter", "hf/ (the fused model in Hugging Face form)",
                 "llama.cpp's convert_hf_to_gguf.py (gguf.outtype)", FUSED, unquantized=True)
QUANTIZER = Kind("quantizer", "the converter's file", "llama.cpp's quantizer (gguf.quantizations)", FUSED)
IMATRIX = Kind("imatrix", "the converter's file + an importance matrix of the training split",
               "llama-imatrix, then llama-quantize --imatrix (gguf.imatrix)", FUSED)
NATIVE_FUSE = Kind("native-fuse", "a --no-dequantize fuse (fused/, or fused-native/ for a QLoRA run)",
                   "fuse --no-dequantize, MLX blocks transcoded (no 2nd quantization)", FUSED)
LORA = Kind("lora", "adapters/ (the MLX adapter)", "MLX adapter -> PEFT -> llama.cpp's convert_lora_to_gguf.py",
            TRAINED, standalone=False)
LORA_BASE_F16 = Kind("lora-base-f16", "the training base (base-quantized/ de-quantized exactly, or base/)",
                     "LoRA GGUF on the de-quantized training base (F16)", TRAINED, pairs_with_lora=True,
                     unquantized=True)
NATIVE_BASE = Kind("native-base", "base-quantized/ (the QLoRA training base)",
                   "LoRA GGUF on the training base's MLX blocks (Q4_1/Q5_1, transcoded)", TRAINED,
                   pairs_with_lora=True)

KINDS = {k.name: k for k in (CONVERTER, QUANTIZER, IMATRIX, NATIVE_FUSE, LORA, LORA_BASE_F16, NATIVE_BASE)}


def get(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise PipelineError(f"GGUF kind {name!r} is not known (known: {', '.join(KINDS)}); gguf/manifest.json was "
                            "written by another version. Run `make gguf` (or `mlx-pipeline gguf`) again.") from None


def entry(kind: Kind, key: str, path, sha256: str | None = None, **extra) -> dict:
    """A gguf/manifest.json files entry: the file, its kind and the key `--type` matches. `sha256`: the
    file's, when the caller already hashed it (09 hashes each file while the next one is made)."""
    return {"type": key, "kind": kind.name, "file": path.name, "path": str(path), "size_bytes": path.stat().st_size,
            "sha256": sha256 or sha256_file(path), **extra}


def pair_key(base_key: str) -> str:
    """The `--type` key of a base GGUF + the LoRA GGUF (F16+LORA, Q4_1-NATIVE-BASE+LORA)."""
    return f"{base_key.upper()}+LORA"
