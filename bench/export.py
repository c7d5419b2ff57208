"""08 + 09 (fused MLX model -> Hugging Face -> GGUF) vs llama.cpp's converter + quantizer by hand.

    python -m bench.export                       # Q8_0, 2 repeats (fits make bench's budget)
    python -m bench.export --types Q8_0,Q4_K_M   # the default export's K-quant too (slower on both sides)
    python -m bench.export --working-f16         # the F16 a working file, as gguf.keep_unquantized auto
                                                 # makes it for this model (above 2 GB)

Input: the synthetic 1.2 B Llama (bf16) fused with --de-quantize with bench.inputs' 2-iteration
adapter, in a run of its own under bench/work/export/ (07 runs once, then is reused).
Ours: `mlx-pipeline gguf` with only fused/ present, so 08 writes hf/ on the way: llama.cpp's
converter to F16, then llama.cpp's quantizer (the pinned library, in a child) per type.
Anchor: what a user does by hand on the same fused/ folder: `convert_hf_to_gguf.py --outtype f16`,
then `llama-quantize` per type (binaries from `python -m pipeline.llamacpp`).
Recorded: wall time and peak RSS (the whole process tree) and their ratios; the bytes each side
leaves on disk, and the run folder's size against the base model's (the disk report of 09).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from . import harness, inputs
from .harness import WORK, Cmd

RUN = "export-1b"
HERE = WORK / "export"
MODELS = HERE / "runs"


def prepared_fused() -> Path:
    """bench.inputs' 1B run (data, 4-bit base, adapter) linked into a run of our own, fused once;
    base/ made by our 02 from the synthetic model's folder (hard links to it, as for a user's folder)."""
    from pipeline.fsio import linked_bytes

    source = inputs.synthetic_run("1b")
    run_dir = MODELS / RUN
    model = inputs.synthetic_model("1b")
    if not (run_dir / "base" / "manifest.json").exists() or not linked_bytes(run_dir / "base", model):
        print(f"[export] 02 base for the {RUN} run (hard links to {model})", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([*inputs.cli(), "base", *run_args()], check=True)
    for part in ("data", "base-quantized", "adapters"):
        if not (run_dir / part / "manifest.json").exists():
            shutil.rmtree(run_dir / part, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            # hard links: every pipeline writer replaces files by rename, so neither run changes the other's
            subprocess.run(["cp", "-al", str(source / part), str(run_dir / part)], check=True)
    if not (run_dir / "fused" / "manifest.json").exists():
        print(f"[export] 07 fuse --de-quantize for the {RUN} run (once)", flush=True)
        subprocess.run([*inputs.cli(), "fuse", "--de-quantize", *run_args()], check=True)
    return run_dir


def run_args(keep_f16: bool = True) -> list[str]:
    config = HERE / (f"{RUN}.yaml" if keep_f16 else f"{RUN}-working-f16.yaml")
    text = inputs.run_config("1b").read_text().replace("run: synthetic-1b", f"run: {RUN}")
    # explicit either way: the default (auto) makes this 2.4 GB model's F16 a working file
    text = text.replace("\ngguf:\n", f"\ngguf:\n  keep_unquantized: {'true' if keep_f16 else 'false'}\n")
    if not config.exists() or config.read_text() != text:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(text)
    return ["--config", str(config), "--run", RUN, "--models-dir", str(MODELS)]


def main(argv: list[str] | None = None) -> dict:
    from pipeline import llamacpp
    from pipeline.fsio import disk_usage, human_size, linked_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0", help="quantizations, comma-separated (default Q8_0)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--working-f16", action="store_true",
                    help="gguf.keep_unquantized: false (the F16 a working file); the anchor then deletes its F16 too")
    args = ap.parse_args(argv)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]

    run_dir = prepared_fused()
    fused, by_hand = run_dir / "fused", HERE / "by-hand"

    def clean_ours():
        for part in ("hf", "gguf"):
            shutil.rmtree(run_dir / part, ignore_errors=True)
        shutil.rmtree(by_hand, ignore_errors=True)  # one side's outputs at a time on the disk

    def clean_anchor():
        clean_ours()
        by_hand.mkdir(parents=True)

    converter = llamacpp.require_converter() / llamacpp.CONVERTER
    quantize = llamacpp.tool("llama-quantize")
    f16 = by_hand / f"{RUN}-F16.gguf"
    steps = [f"{sys.executable} {converter} {fused} --outfile {f16} --outtype f16"]
    steps += [f"{quantize} {f16} {by_hand / f'{RUN}-{t}.gguf'} {t}" for t in types]
    if args.working_f16:
        steps.append(f"rm {f16}")
    anchor = Cmd(["bash", "-c", " && ".join(steps)], env=llamacpp.converter_env(), before=clean_anchor,
                 label=f"convert_hf_to_gguf.py --outtype f16 + llama-quantize {' '.join(types)}")
    ours = Cmd([*inputs.cli(), "gguf", *run_args(not args.working_f16), "--quantization", ",".join(types)],
               before=clean_ours, label=f"mlx-pipeline gguf (08 hf + 09 F16, {', '.join(types)})"
               + (", gguf.keep_unquantized false" if args.working_f16 else ""))
    if args.working_f16:
        anchor.label += f" + rm {f16.name}"
    name = "export-08-09-vs-llama.cpp" + ("-working-f16" if args.working_f16 else "")

    base_bytes = disk_usage(run_dir)["folders"]["base"]["bytes"]
    what = (f"08+09 on the synthetic 1.2 B Llama fused --de-quantize (bf16, {human_size(base_bytes)}): "
            f"F16{' (working file)' if args.working_f16 else ''} + {', '.join(types)}; ours vs"
            f" llama.cpp's converter + quantizer by hand")
    disk: dict = {}

    def measure_disk_after(side: str, cmd: Cmd) -> Cmd:
        def figures(_log: str) -> dict:
            if side == "ours":
                usage = disk_usage(run_dir)
                disk["ours"] = usage
                written = sum(usage["folders"].get(p, {}).get("bytes", 0) for p in ("hf", "gguf"))
            else:
                written = disk_usage(by_hand)["total_bytes"]
                disk["anchor"] = written
            return {"written_gb": written / 1e9}
        cmd.figures = figures
        return cmd

    row = harness.compare(name, measure_disk_after("ours", ours),
                          measure_disk_after("anchor", anchor), repeats=args.repeats, what=what,
                          extra={"types": types, "base_bytes": base_bytes})
    usage = disk["ours"]
    row["run_folder"] = {"total_bytes": usage["total_bytes"], "x_base": round(usage["total_bytes"] / base_bytes, 2),
                         "folders": {k: v["bytes"] for k, v in usage["folders"].items()},
                         "shared_bytes": {k: v["shared_bytes"] for k, v in usage["folders"].items()
                                          if v["shared_bytes"]}}
    # base/ is hard links to the model's folder (02): bytes the run did not add to the disk
    linked = linked_bytes(run_dir, inputs.synthetic_model("1b"))
    row["run_folder"].update(source_linked_bytes=linked, new_bytes=usage["total_bytes"] - linked,
                             new_x_base=round((usage["total_bytes"] - linked) / base_bytes, 2))
    harness.record(name, row)
    _print_table(row, base_bytes)
    return row


def _print_table(row: dict, base_bytes: int) -> None:
    o, a, r = row["ours"], row["anchor"], row["ratio"]
    print(f"\n{row['what']}\n")
    print("| | wall s (runs) | CPU s | peak RSS GB | x model | written GB |")
    print("|---|---|---|---|---|---|")
    for name, side in (("ours", o), ("by hand", a)):
        runs = ", ".join(f"{w:.1f}" for w in side.get("runs_wall_s", []))
        print(f"| {name} | {side['wall_s']:.1f} ({runs}) | {side.get('cpu_s', 0):.1f} | {side['peak_rss_gb']:.2f} | "
              f"{side['peak_rss_gb'] * 1e9 / base_bytes:.2f}x | {side.get('written_gb', 0):.2f} |")
    print(f"| ratio | {r.get('wall_s', 0):.2f}x | {r.get('cpu_s', 0):.2f}x | {r.get('peak_rss_gb', 0):.2f}x | | "
          f"{r.get('written_gb', 0):.2f}x |")
    rf = row["run_folder"]
    gb = {k: round(v / 1e9, 2) for k, v in rf["folders"].items()}
    shared = {k: round(v / 1e9, 2) for k, v in rf["shared_bytes"].items()}
    print(f"\nrun folder: {rf['total_bytes'] / 1e9:.2f} GB = {rf['x_base']}x the base model; {json.dumps(gb)} GB; "
          f"shared (hard links, counted once): {json.dumps(shared)} GB")
    print(f"new bytes (less the model source's own files, hard-linked into base/): {rf['new_bytes'] / 1e9:.2f} GB "
          f"= {rf['new_x_base']}x the base model")


if __name__ == "__main__":
    main()
