"""python scripts/phase4-fine-tune-model/07_fuse_lora.py --no-dequantize
python scripts/phase4-fine-tune-model/07_fuse_lora.py --base-model models/demo/base-quantized \
    --adapter-path models/demo/adapters --output-dir fused-model --de-quantize

Same as `mlx-pipeline fuse`; `--help` lists every option (flags > environment > YAML > defaults).
`--de-quantize` writes full-precision weights (about parameters x 2 bytes in bf16).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("fuse")
