"""python scripts/phase5-convert-model-formats/09_convert_to_gguf.py --quantization Q4_K_M,Q8_0

Same as `mlx-pipeline gguf`; `--help` lists every option (flags > environment > YAML > defaults).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.cli import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("gguf")
