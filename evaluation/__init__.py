"""Benchmarks of fnprune against pruning baselines (not part of the package)."""
