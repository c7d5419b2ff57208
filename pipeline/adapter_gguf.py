"""The MLX LoRA adapter as a llama.cpp LoRA adapter GGUF (llama.cpp `--lora`, Ollama `ADAPTER`).

Path: MLX adapter -> PEFT folder -> llama.cpp's own `convert_lora_to_gguf.py` (pinned release,
its gguf-py first, as pipeline/llamacpp.py runs the main converter), its model class given the
hparams the base GGUF's conversion used (_LORA_BOOTSTRAP: Granite 4.0 H-Micro / Micro need it).

Math. mlx-lm's LoRALinear computes y = W x + scale * (x @ lora_a) @ lora_b with lora_a (in x r)
and lora_b (r x out), so delta W (out x in) = scale * lora_b.T @ lora_a.T. PEFT computes
delta W = (lora_alpha / r) * lora_B @ lora_A, hence lora_A = lora_a.T (r x in),
lora_B = lora_b.T (out x r) and lora_alpha = scale * r. llama.cpp applies
scale = lora_alpha / rank at run time: the same delta.

Base it pairs with. QLoRA trains the adapter on the quantized base: the adapter learned
corrections relative to those 4-bit weights. llama.cpp adds the adapter to whatever base GGUF it
is given, so the base that reproduces MLX base + adapter is the quantized training base,
dequantized exactly (w = scale * q + bias in float32) and written as F16:
`<run>-adapter-base-F16.gguf`. (With quantize.enabled false the training base is the HF base
itself.) Phase 09 also transcodes the quantized training base's own blocks (4-bit -> Q4_1) into
`<run>-Q4_1-native-base.gguf` (`native_base_path`), with the F16 file as template: the same
weights at ~4.5 bits per weight, so that pair is the trained QLoRA model at ~0.6x Q8_0's size.

Only dense LoRA adapters: DoRA (a magnitude vector llama.cpp cannot represent), full fine-tuning
(no adapter) and mixture-of-experts adapters (3-D lora tensors) fail with a PipelineError.
LoRA on lm_head is exported when the base has its own lm_head (llama.cpp's output.weight);
with tied embeddings, and LoRA on embed_tokens, it is refused.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import agreement, arch, llamacpp
from .data.formats import prompt_and_answer
from .errors import MissingInputError, PipelineError
from .fsio import atomic_path, hash_model_dir, sha256_file, write_json
from .hf_export import copy_tokenizer_files, dense_weights, hf_config, save_shards
from .manifest import MANIFEST, read_adapter_manifest
from .metrics import score_answers
from .paths import AdapterChoice, RunPaths

LORA_CONVERTER = "convert_lora_to_gguf.py"
OUTTYPE = "F16"


def adapter_gguf_path(cfg) -> Path:
    return RunPaths(cfg).gguf / f"{cfg.run}-adapter-LoRA-{OUTTYPE}.gguf"


def paired_base_path(cfg) -> Path:
    return RunPaths(cfg).gguf / f"{cfg.run}-adapter-base-{OUTTYPE}.gguf"


def native_base_path(cfg, native_type: str = "Q4_1") -> Path:
    """The training base's own MLX blocks as GGUF (phase 09 writes it for a QLoRA run): with the LoRA
    GGUF, the trained model itself at ~4.5 bits per weight."""
    return RunPaths(cfg).gguf / f"{cfg.run}-{native_type}-native-base.gguf"


def sidecar_path(cfg) -> Path:
    return RunPaths(cfg).gguf / f"{cfg.run}-adapter-gguf.json"


# --------------------------------------------------------------------------------------------
# MLX adapter -> PEFT


def mlx_to_peft(adapter_dir: Path, out_dir: Path, base_config: dict, base_name: str = "") -> dict:
    """Write a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for an MLX adapter."""
    import mlx.core as mx
    from safetensors.numpy import save_file

    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapters.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise MissingInputError(f"{adapter_dir} has no adapter_config.json / adapters.safetensors. "
                                "Run `make train` (or `mlx-pipeline train`) first.")
    acfg = json.loads(cfg_file.read_text())
    kind = acfg.get("fine_tune_type", "lora")
    if kind == "dora":
        raise PipelineError("DoRA adapters cannot be written as a llama.cpp LoRA GGUF (llama.cpp has no DoRA "
                            "magnitude vector). Fuse the adapter (`make gguf` without --adapter-gguf) instead.")
    if kind == "full":
        raise PipelineError("Full fine-tuning has no adapter to export as a LoRA GGUF: the fused model's GGUF "
                            "(`make gguf`) is the whole fine-tune.")
    if kind != "lora":
        raise PipelineError(f"Unknown fine_tune_type '{kind}' in {cfg_file}: only LoRA exports as a LoRA GGUF.")
    lp = acfg.get("lora_parameters") or {}
    rank, scale = int(lp["rank"]), float(lp["scale"])

    weights = mx.load(str(weights_file))
    modules: dict[str, dict] = collections.defaultdict(dict)
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise PipelineError(f"{weights_file}: unexpected tensor '{name}' (only lora_a / lora_b of a dense "
                                "LoRA export to llama.cpp).")
        modules[module][leaf] = value
    _refuse_experts(modules, weights_file)
    tied = bool(base_config.get("tie_word_embeddings", False))
    peft: dict[str, np.ndarray] = {}
    targets: set[str] = set()
    for module, ab in sorted(modules.items()):
        if set(ab) != {"lora_a", "lora_b"}:
            raise PipelineError(f"{weights_file}: {module} has {sorted(ab)}, expected lora_a and lora_b.")
        a, b = ab["lora_a"], ab["lora_b"]
        short = module.rsplit(".", 1)[-1]
        if "embed_tokens" in short:
            raise PipelineError(f"{module}: LoRA on the token embedding is not exported to llama.cpp "
                                "(fuse the adapter instead).")
        if short == "lm_head" and tied:
            raise PipelineError("The adapter trains lm_head but the base ties it to the token embedding: "
                                "llama.cpp's base GGUF has no separate output.weight to adapt "
                                "(convert_lora_to_gguf refuses it). Fuse the adapter instead.")
        if a.shape[1] != rank or b.shape[0] != rank:
            raise PipelineError(f"{module}: lora_a {a.shape} / lora_b {b.shape} do not have rank {rank}.")
        prefix = f"base_model.model.{module}"
        peft[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.array(a.astype(mx.float32)).T)  # r x in
        peft[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.array(b.astype(mx.float32)).T)  # out x r
        targets.add(short)
    if not peft:
        raise PipelineError(f"{weights_file} holds no LoRA tensors.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(peft, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
        "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base_name,
    })
    return {"rank": rank, "scale": scale, "lora_alpha": scale * rank, "modules": len(modules),
            "target_modules": sorted(targets), "num_layers": acfg.get("num_layers"),
            "adapter_parameters": int(sum(v.size for v in peft.values()))}


# convert_lora_to_gguf.py hands its model class the base's hparams as transformers' AutoConfig reads
# them, while convert_hf_to_gguf.py lets the class read them itself; Mamba2-derived classes
# (GraniteHybridModel: Granite 4.0 H-*, Micro; Bamba) read the raw config.json. transformers 5
# rewrites granitemoehybrid `layer_types` mamba/attention as linear_attention/full_attention, so in
# the LoRA converter GraniteHybridModel finds no attention layer and takes every layer for Mamba:
# attn_q/attn_k LoRA skip the RoPE row permutation the base got (H-Micro: pair KL 0.02), and an
# all-attention model (Micro) stays `granitehybrid` while its base is written as `granite`
# (llama.cpp: SIGSEGV loading the pair). This bootstrap runs the script unchanged, giving such
# classes the raw config.json, exactly what the base conversion saw.
_LORA_BOOTSTRAP = """
import json, os, runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.argv = [str(script)] + sys.argv[2:]
sys.path.insert(0, str(script.parent))
if 'NO_LOCAL_GGUF' not in os.environ:
    sys.path.insert(1, str(script.parent / 'gguf-py'))
from conversion import ModelBase, get_model_class
from conversion.mamba import Mamba2Model
_load = ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    hparams = _load(dir_model, is_mistral_format)
    raw_file = Path(dir_model) / 'config.json'
    if is_mistral_format or not raw_file.is_file():
        return hparams
    raw = json.loads(raw_file.read_text())
    try:
        cls = get_model_class((raw.get('architectures') or [''])[0])
    except NotImplementedError:
        return hparams
    return raw if issubclass(cls, Mamba2Model) else hparams
ModelBase.load_hparams = staticmethod(load_hparams)
runpy.run_path(str(script), run_name='__main__')
"""


def _refuse_experts(modules: dict[str, dict], weights_file: Path) -> None:
    """Mixture-of-experts LoRA (mlx-lm's LoRASwitchLinear: lora_b [experts, out, r], and in mlx-lm 0.32
    lora_a [experts, r, in] too) has no llama.cpp LoRA form: refuse it before anything is written,
    naming every such layer and each tensor's actual ndim and shape."""
    moe = {m: ab for m, ab in modules.items() if any(v.ndim != 2 for v in ab.values())}
    if not moe:
        return
    first, ab = next(iter(sorted(moe.items())))
    shapes = ", ".join(f"{leaf} {v.ndim}-D {tuple(v.shape)}" for leaf, v in sorted(ab.items()))
    raise PipelineError(
        f"{first}: {shapes}: a mixture-of-experts layer (one LoRA per expert); llama.cpp LoRA adapters hold "
        f"2-D tensors only. {len(moe)} such layer(s) in {weights_file}: {', '.join(sorted(moe))}. "
        "Fuse the adapter instead (`make gguf` without --adapter-gguf).")


def convert_lora(peft_dir: Path, base_hf: Path, outfile: Path, outtype: str = OUTTYPE) -> list[str]:
    """llama.cpp's convert_lora_to_gguf.py on a PEFT folder (this interpreter, cached gguf-py first),
    its model class seeing the base's hparams as the base GGUF's conversion did (_LORA_BOOTSTRAP)."""
    d = llamacpp.require_converter()
    script = d / LORA_CONVERTER
    if not script.is_file():
        raise MissingInputError(f"{script} is missing (older converter cache). Run `python -m pipeline.llamacpp "
                                "fetch --force`.")
    cmd = [sys.executable, "-c", _LORA_BOOTSTRAP, str(script), "--base", str(base_hf), "--outfile", str(outfile),
           "--outtype", outtype.lower(), str(peft_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=llamacpp.converter_env())
    log = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0 or not Path(outfile).is_file():
        raise PipelineError(f"llama.cpp's LoRA converter failed on {peft_dir} (exit {proc.returncode}). Its last "
                            "lines:\n" + "\n".join("    " + line for line in log[-25:]))
    return log


# --------------------------------------------------------------------------------------------
# The base GGUF it pairs with


def write_dequantized_hf(model_dir: Path, base_dir: Path, out: Path) -> None:
    """An HF folder (float32) of an MLX quantized model with every layer dequantized exactly."""
    import mlx.core as mx

    weights, mlx_config = dense_weights(model_dir, mx.float32)
    weights = arch.get(mlx_config["model_type"]).to_hf_weights(weights, mlx_config)
    base_config = json.loads((base_dir / "config.json").read_text())
    config, _ = hf_config(base_config, "float32", tied="lm_head.weight" not in weights)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    save_shards(weights, out, 4 * 10**9)
    write_json(out / "config.json", config)
    copied = copy_tokenizer_files(base_dir, out)
    if "generation_config.json" not in copied:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        write_json(out / "generation_config.json", {k: config[k] for k in ids if k in config})


def _is_quantized(model_dir: Path) -> bool:
    c = json.loads((model_dir / "config.json").read_text())
    return isinstance(c.get("quantization"), dict) or isinstance(c.get("quantization_config"), dict)


def write_paired_base(cfg, out: Path, pair_with: str = "train_base") -> dict:
    """The base GGUF (F16) the adapter applies to. pair_with: 'train_base' (the model the adapter was
    trained on, dequantized: the default) or 'hf_base' (the original HF base)."""
    import tempfile

    if pair_with not in ("train_base", "hf_base"):
        raise PipelineError(f"pair_with must be train_base or hf_base, not {pair_with!r}.")
    paths = RunPaths(cfg)
    source = paths.train_base if pair_with == "train_base" else paths.base
    t0 = time.time()
    with atomic_path(out) as tmp:
        if _is_quantized(source):
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".adapter-base-hf-") as d:
                hf = Path(d) / "hf"
                write_dequantized_hf(source, paths.base, hf)
                llamacpp.convert_hf_to_gguf(hf, tmp, OUTTYPE.lower())
        else:
            llamacpp.convert_hf_to_gguf(source, tmp, OUTTYPE.lower())
    return {"source": str(source), "dequantized": _is_quantized(source), "seconds": round(time.time() - t0, 2)}


# --------------------------------------------------------------------------------------------
# Public entry point


def write_adapter_gguf(cfg, pair_with: str = "train_base") -> dict:
    """Write gguf/<run>-adapter-LoRA-F16.gguf and the base GGUF it pairs with
    (gguf/<run>-adapter-base-F16.gguf, made only when missing or made from another base).
    Returns paths and stats (also in gguf/<run>-adapter-gguf.json)."""
    import tempfile

    if pair_with not in ("train_base", "hf_base"):
        raise PipelineError(f"pair_with must be train_base or hf_base, not {pair_with!r}.")
    paths = RunPaths(cfg)
    llamacpp.require_converter()
    choice = paths.adapter_choice
    read_adapter_manifest(choice.source, choice.kind)
    check_fused_adapter(paths, choice)
    click.echo(f"      {choice.describe()}")
    base_dir = paths.base
    if not (base_dir / "config.json").is_file():
        raise MissingInputError(f"{base_dir} is missing: the LoRA converter needs the base model's config.json. "
                                "Run `make base` first.")
    base_config = json.loads((base_dir / "config.json").read_text())
    out = adapter_gguf_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".adapter-peft-") as d:
        peft_dir = Path(d) / "peft"
        stats = mlx_to_peft(choice.folder, peft_dir, base_config, base_name=str(base_dir))
        with atomic_path(out) as tmp:
            convert_lora(peft_dir, base_dir, tmp)
    adapter_seconds = round(time.time() - t0, 2)

    base_out = paired_base_path(cfg)
    source = paths.train_base if pair_with == "train_base" else paths.base
    source_hash = hash_model_dir(source)
    side = sidecar_path(cfg)
    previous = json.loads(side.read_text()) if side.is_file() else {}
    reuse = (base_out.is_file() and previous.get("base", {}).get("pair_with") == pair_with
             and previous.get("base", {}).get("source_content_hash") == source_hash
             and previous.get("base", {}).get("sha256") == sha256_file(base_out))
    if reuse:
        base_info = dict(previous["base"], reused=True)
    else:
        base_info = write_paired_base(cfg, base_out, pair_with)
        base_info.update(source_content_hash=source_hash, sha256=sha256_file(base_out), reused=False)
    base_info.update(path=str(base_out), size_bytes=base_out.stat().st_size, pair_with=pair_with)

    result = {
        "adapter_gguf": str(out), "base_gguf": str(base_out), "adapter_size_bytes": out.stat().st_size,
        "adapter_sha256": sha256_file(out), "adapter_seconds": adapter_seconds,
        "adapter_source": str(choice.folder),
        "adapter_source_sha256": sha256_file(choice.file),
        "adapter": choice.record(),
        **stats, "base": base_info,
        "usage": {"llama.cpp": f"llama-cli -m {base_out.name} --lora {out.name}",
                  "llama_cpp_python": f"Llama(model_path='{base_out.name}', lora_path='{out.name}')",
                  "ollama": f"FROM ./{base_out.name}\nADAPTER ./{out.name}"},
    }
    write_json(side, result)
    return result


def check_fused_adapter(paths: RunPaths, choice: AdapterChoice) -> None:
    """The LoRA GGUF must carry the adapter fused/ was made from (09 exports both from one run):
    refused when the config chooses another one than 07 fuse used (ADAPTER / --adapter changed)."""
    try:
        fused = json.loads((paths.fused / MANIFEST).read_text()).get("adapter") or {}
    except (OSError, ValueError, AttributeError):
        return  # no fuse yet, or one from before adapters were recorded
    made, now = fused.get("sha256"), sha256_file(choice.file) if choice.file.is_file() else None
    if made and made != now:
        raise PipelineError(
            f"{paths.fused} was fused from the {adapter_words(fused)} adapter ({fused.get('folder')}), but the "
            f"config chooses {choice.describe().removeprefix('adapter: ')}: the LoRA GGUF would carry another "
            f"fine-tune than the other GGUF files. Fuse that one first (`make gguf ADAPTER={choice.kind}` re-fuses, "
            f"or `mlx-pipeline fuse --adapter {choice.kind}`), or export the fused one: --adapter "
            f"{fused.get('adapter', 'best')} (ADAPTER={fused.get('adapter', 'best')}).")


def adapter_words(record: dict) -> str:
    """A manifest's `adapter` record (paths.AdapterChoice.record) in words: "best (step 120)", "last step"."""
    if record.get("adapter") == "best":
        return f"best (step {record['step']})" if record.get("step") is not None else "best"
    return "last step's"


# --------------------------------------------------------------------------------------------
# Verification: base GGUF + LoRA GGUF in llama.cpp vs MLX train base + adapter


def compare_with_mlx(cfg, base_gguf: Path | None = None, lora_gguf: Path | None = None, max_rows: int | None = None,
                     max_samples: int = 0, max_tokens: int | None = None, with_base_alone: bool = True) -> dict:
    """Mean next-token KL(MLX train base + adapter || llama.cpp base GGUF + LoRA GGUF) on test-split
    conversations, top-1 agreement, and (max_samples > 0) the task metric of greedy answers of both.
    `with_base_alone` adds the same numbers for the base GGUF without the LoRA (the gap it closes)."""
    paths = RunPaths(cfg)
    base_gguf = Path(base_gguf or paired_base_path(cfg))
    lora_gguf = Path(lora_gguf or adapter_gguf_path(cfg))
    max_rows = cfg.verify.max_rows if max_rows is None else max_rows
    max_tokens = cfg.eval.max_tokens if max_tokens is None else max_tokens
    rows = agreement.read_rows(paths.data / "test.jsonl")
    model, tokenizer = agreement.load_trained(paths.train_base, paths.adapter)
    convs = agreement.conversations(tokenizer, rows[:max_rows])
    trained = agreement.cached(agreement.mlx_scorer(model), convs, "all")
    prompts, refs = zip(*[prompt_and_answer(r) for r in rows[:max_samples]]) if max_samples else ((), ())
    prompt_ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=False) for m in prompts]
    n_ctx = agreement.context_length(convs, prompt_ids, max_tokens)
    report: dict = {"rows_compared": len(convs), "rows_answered": len(prompts), "base_gguf": str(base_gguf),
                    "lora_gguf": str(lora_gguf)}
    if prompts:
        report["mlx"] = {"metric": score_answers(agreement.mlx_answers(model, tokenizer, list(prompts), max_tokens),
                                                 list(refs))}
    for label, lora in [("gguf_base_lora", lora_gguf)] + ([("gguf_base_alone", None)] if with_base_alone else []):
        llm = llamacpp.open_gguf(base_gguf, n_ctx, cfg.seed, lora=lora)
        try:
            with llamacpp.captured_log():
                row = agreement.compare(trained, agreement.gguf_scorer(llm), convs, "all")
                if prompts:
                    answers = agreement.gguf_answers(llm, agreement.gguf_metadata(llm), list(prompts), max_tokens)
                    row["metric"] = score_answers(answers, list(refs))
        finally:
            llm.close()
        report[label] = row
    return report
