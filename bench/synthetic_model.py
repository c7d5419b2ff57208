"""Write a Llama-shaped model with random bf16 weights, of a chosen size, as a Hugging Face folder.

    python -m bench.synthetic_model --size 1b --out bench/work/synthetic-1b

For memory and speed benchmarks at real sizes without a model hub: the weights are random
(small, so activations stay finite), the tokenizer is SmolLM2's from the embedded GGUF.
Tensors are generated and written one shard at a time, so writing an 8 B model needs ~2 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

# Llama 3.2 1B/3B and Llama 3.1 8B shapes, with SmolLM2's 49,152-token vocabulary.
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}
SHARD_BYTES = 2 * 2**30


def config_for(size: str) -> dict:
    s = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "torch_dtype": "bfloat16", **s,
    }


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def _bf16(shape, rng) -> np.ndarray:
    """Random bf16 values as uint16 bit patterns (numpy has no bfloat16)."""
    if len(shape) == 1:
        x = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
    else:
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.8 / np.sqrt(shape[-1]))
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _write_shard(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, a in tensors:
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, a in tensors:
            f.write(a.tobytes())


def write_model(size: str, out: Path, seed: int = 0) -> Path:
    from pipeline.embedded import embedded_gguf

    out.mkdir(parents=True, exist_ok=True)
    c = config_for(size)
    rng = np.random.default_rng(seed)
    shards, current, current_bytes = [], [], 0
    for name, shape in tensor_shapes(c):
        nbytes = int(np.prod(shape)) * 2
        if current and current_bytes + nbytes > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
    shards.append(current)
    index, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = [(name, _bf16(shape, rng)) for name, shape in shard]
        _write_shard(out / fname, tensors)
        total += sum(a.nbytes for _, a in tensors)
        index.update({name: fname for name, _ in shard})
        print(f"  wrote {fname} ({sum(a.nbytes for _, a in tensors) / 1e9:.2f} GB)", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    tok_cache = out.parent / ".smollm2-tokenizer"
    if not (tok_cache / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        gguf = embedded_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tok_cache))
    for f in tok_cache.iterdir():
        shutil.copy2(f, out / f.name)
    n = sum(int(np.prod(s)) for _, s in tensor_shapes(c))
    print(f"{out}: {n / 1e9:.2f} B parameters, {total / 1e9:.2f} GB bf16", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_model(a.size, a.out, a.seed)


if __name__ == "__main__":
    main()
