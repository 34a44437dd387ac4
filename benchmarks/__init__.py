"""Benchmark scripts of st_keras; results go to BENCHMARKS.md (see DESIGN.md §8)."""
