"""python scripts/phase5-convert-model-formats/09_convert_to_gguf.py \
    --hf-model hf-model --output gguf/my-model --quantization Q4_K_M

Same as `mlx-pipeline gguf` (without --hf-model: the run's hf/ to gguf/); `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("gguf")
