"""python scripts/phase2-base-model/02_fetch_base_model.py --model embedded:smollm2

Same as `mlx-pipeline base`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("base")
