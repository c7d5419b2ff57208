"""python scripts/phase3-train/06_generate.py --prompt 'Ken ordered 2 red lamps for Oslo.'

Same as `mlx-pipeline generate`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("generate")
