"""python scripts/phase2-base-model/03_quantize_base_model.py --bits 4 --group-size 64

Same as `mlx-pipeline quantize`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("quantize")
