"""python scripts/phase5-convert-model-formats/08_convert_to_hf.py --mlx-model fused-model --output-dir hf-model

Same as `mlx-pipeline hf` (without --mlx-model: the run's fused/ to hf/); `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("hf")
