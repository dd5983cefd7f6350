"""Benchmarks: the load generator, the baselines and the harness that runs them side by side."""
