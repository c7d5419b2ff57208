"""python scripts/phase3-train/05_evaluate.py --max-samples 60

Same as `mlx-pipeline eval`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("eval")
