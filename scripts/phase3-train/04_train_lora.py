"""python scripts/phase3-train/04_train_lora.py --rank 8 --iters 200

Same as `mlx-pipeline train`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("train")
