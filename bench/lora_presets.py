"""Trainable parameters of each LoRA target preset and rank, measured on the real module trees.

    python -m bench.lora_presets [--ranks 8,16,32,64] [--model smollm2-135m ...]

For every model below, each preset of `train.targets` (`attention`, `mlp`, `attention,mlp` = the
default, and `attention,mlp,lm_head` where the model has its own lm_head) and each rank, the model
is built by mlx-lm from its config.json shape, frozen and wrapped exactly as 04 train does
(pipeline.arch.resolve_targets + p04's `_apply_lora`, i.e. mlx-lm's linear_to_lora_layers, on the
last `train.num_layers` layers of the model's config file), then counted from the module tree:
total (every parameter array: base + LoRA A/B), trainable (model.trainable_parameters(), what 04
optimizes and saves), frozen = total - trainable, which is checked to equal the base model's count.
Nothing is a formula. pipeline.modeling.count_parameters (what 04 prints) is recorded beside it and
agrees (tests/test_lora_presets.py).

No weights are needed: MLX creates parameters lazily and nothing here evaluates them, so building
a 3 B model allocates no 3 B parameters (the whole run takes seconds and < 1 GB).
The configs are the public Hugging Face config.json of each checkpoint (shape keys only matter):
SmolLM2-135M-Instruct as 02 base imports it from the embedded GGUF, meta-llama/Llama-3.2-3B-Instruct,
ibm-granite/granite-4.0-h-micro (40 layers: 4 attention, 36 Mamba2; all three tie lm_head to the
embeddings, so the lm_head preset does not apply to them). Results: bench/results/lora_presets.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

from .harness import RESULTS

PRESETS = {"attention": ["attention"], "mlp": ["mlp"], "attention,mlp": ["attention", "mlp"],
           "attention,mlp,lm_head": ["attention", "mlp", "lm_head"]}
RANKS = (8, 16, 32, 64)

SMOLLM2_135M = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
}
LLAMA_3_2_3B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
    "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
# 4 attention layers among 40; where they sit changes no count when every layer is adapted
# (configs/granite-4.0-h-micro.yaml: num_layers -1), so they are spread evenly here.
GRANITE_4_0_H_MICRO = {
    "model_type": "granitemoehybrid", "architectures": ["GraniteMoeHybridForCausalLM"], "vocab_size": 100352,
    "hidden_size": 2048, "intermediate_size": 8192, "shared_intermediate_size": 8192, "num_hidden_layers": 40,
    "layer_types": ["attention" if i % 10 == 5 else "mamba" for i in range(40)],
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "position_embedding_type": "nope", "rope_theta": 10000.0, "attention_bias": False,
    "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
    "logits_scaling": 8.0, "num_local_experts": 0, "num_experts_per_tok": 0, "mamba_n_heads": 64,
    "mamba_d_head": 64, "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_n_groups": 1,
    "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "normalization_function": "rmsnorm", "tie_word_embeddings": True,
}
COUNT_PARAMETERS_NOTE = (
    "04 prints the same figures (pipeline.modeling.count_parameters counts every module's own arrays; "
    "mlx-lm's get_total_parameters, which it used before, counted leaf modules only and left out LoRA A/B).")
# name -> (config, train.num_layers of the config file users start from, that file)
MODELS = {
    "SmolLM2-135M": (SMOLLM2_135M, 8, "configs/default.yaml"),
    "Llama 3.2 3B": (LLAMA_3_2_3B, 16, "configs/llama-3.2-3b.yaml"),
    "Granite 4.0 H-Micro": (GRANITE_4_0_H_MICRO, -1, "configs/granite-4.0-h-micro.yaml"),
}


def build(config: dict):
    """The mlx-lm model of `config`, parameters unevaluated (no memory for the weights)."""
    from mlx_lm.utils import _get_classes

    from pipeline import arch

    config = json.loads(json.dumps(config))
    arch.get(config["model_type"]).normalise(config)
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def count(config: dict, targets: list[str], rank: int, num_layers: int = -1, alpha: float = 16.0) -> dict:
    """Build the model, apply LoRA as 04 does, and count. Raises PipelineError where 04 would refuse."""
    from mlx.utils import tree_flatten

    from pipeline import arch
    from pipeline.modeling import count_parameters
    from pipeline.phases.p04_train_lora import _apply_lora

    model = build(config)
    n_layers = len(model.layers)
    layers = n_layers if num_layers == -1 or num_layers > n_layers else num_layers
    model.freeze()
    keys = arch.resolve_targets(config["model_type"], targets)
    _apply_lora(model, layers, {"rank": rank, "scale": alpha / rank, "dropout": 0.0, "keys": keys}, False, targets)
    # Every parameter array of the (unquantized) model: base weights plus LoRA A/B.
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_percent": round(100.0 * trainable / total, 4), "layers": layers, "of_layers": n_layers,
            # 04's printed statistics, which must agree
            "count_parameters": count_parameters(model)}


def base_total(config: dict) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(build(config).parameters()))


def measure(models: dict, ranks=RANKS) -> list[dict]:
    from pipeline.errors import PipelineError

    rows = []
    for name, (config, num_layers, config_file) in models.items():
        base = base_total(config)
        for preset, targets in PRESETS.items():
            for rank in ranks:
                row = {"model": name, "config_file": config_file, "num_layers": num_layers, "preset": preset,
                       "rank": rank, "base_parameters": base}
                try:
                    row.update(count(config, targets, rank, num_layers))
                except PipelineError as e:
                    row["not_applicable"] = str(e).split(". ")[0]
                else:
                    assert row["frozen"] == base, (row, base)  # LoRA freezes exactly the base
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _m(n: int) -> str:
    return f"{n / 1e6:,.2f} M" if n < 1e9 else f"{n / 1e9:,.3f} B"


def markdown(rows: list[dict]) -> str:
    lines = ["| model (layers adapted) | targets | rank | total | trainable | frozen | trainable % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "not_applicable" in r:
            if r["rank"] == RANKS[0]:
                lines.append(f"| {r['model']} | {r['preset']} | all | n/a: lm_head is tied to the embeddings | | | |")
            continue
        lines.append(f"| {r['model']} ({r['layers']} of {r['of_layers']}) | {r['preset']} | {r['rank']} "
                     f"| {r['total']:,} | {r['trainable']:,} | {r['frozen']:,} | {r['trainable_percent']:.3f} % |")
    return "\n".join(lines) + "\n"


def compact(rows: list[dict], ranks=RANKS) -> str:
    """One line per model and preset, ranks as columns (the README's table)."""
    head = "| model (layers adapted / frozen base) | targets | " + " | ".join(f"r={r}" for r in ranks) + " |"
    lines = [head, "|---|---|" + "---|" * len(ranks)]
    seen = {}
    for r in rows:
        seen.setdefault((r["model"], r["preset"]), {})[r["rank"]] = r
    for (model, preset), by_rank in seen.items():
        first = next(iter(by_rank.values()))
        if "not_applicable" in first:
            lines.append(f"| {model} | {preset} | " + " | ".join("n/a (tied lm_head)" for _ in ranks) + " |")
            continue
        label = f"{model} ({first['layers']} of {first['of_layers']} layers / {_m(first['frozen'])})"
        cells = [f"{_m(by_rank[k]['trainable'])} ({by_rank[k]['trainable_percent']:.2f} %)" for k in ranks]
        lines.append(f"| {label} | {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)))
    ap.add_argument("--model", action="append", choices=list(MODELS), help="default: all")
    ap.add_argument("--all-layers", action="store_true", help="adapt every layer instead of the config's num_layers")
    args = ap.parse_args(argv)
    ranks = tuple(int(r) for r in args.ranks.split(","))
    models = {k: v for k, v in MODELS.items() if not args.model or k in args.model}
    if args.all_layers:
        models = {k: (c, -1, f) for k, (c, _, f) in models.items()}
    t0 = time.perf_counter()
    rows = measure(models, ranks)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"command": "python -m bench.lora_presets", "measured_in_s": round(time.perf_counter() - t0, 1),
            "method": "mlx-lm model built from config.json shape (unevaluated), model.freeze(), "
                      "arch.resolve_targets + p04 _apply_lora (mlx-lm linear_to_lora_layers), counted over all "
                      "parameter arrays of the module tree", "count_parameters_note": COUNT_PARAMETERS_NOTE,
            "rows": rows}
    (RESULTS / "lora_presets.json").write_text(json.dumps(data, indent=2) + "\n")
    md = ("# LoRA target presets x rank: parameter counts\n\n`python -m bench.lora_presets` (measured, not a "
          "formula: see the module docstring). Layers adapted: each model's config file's `train.num_layers`.\n\n"
          + compact(rows, ranks) + "\nTotal = frozen base + trainable LoRA A/B. " + COUNT_PARAMETERS_NOTE
          + "\n\n## Every row\n\n" + markdown(rows))
    (RESULTS / "lora_presets.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
