"""Benchmarks: our phases against the tools users would otherwise run, measured in the same run."""
