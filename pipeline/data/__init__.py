"""Training data: JSONL row formats and validation, and the bundled sample task."""
