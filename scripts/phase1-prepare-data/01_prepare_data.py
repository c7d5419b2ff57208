"""python scripts/phase1-prepare-data/01_prepare_data.py --data data.jsonl --run myrun

Phase 01: validate, deduplicate and split JSONL data (chat / completions / text) and print
token statistics. Same as `mlx-pipeline data`; `--data sample` uses the bundled task.
Writes models/<run>/data/{train,valid,test}.jsonl and manifest.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.launch import run_script  # noqa: E402

run_script("data")
