"""python scripts/phase6-deploy/11_install_model.py --run demo [--type Q8_0] [--dry-run | --uninstall]

Same as `mlx-pipeline install` / `make install`; `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

if __name__ == "__main__":
    run_script("install")
