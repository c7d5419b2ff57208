"""python scripts/phase6-deploy/10_verify_gguf.py --max-rows 24 --max-samples 30

Same as `mlx-pipeline verify`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("verify")
