"""Benchmark scripts of st_keras; each writes its section of BENCHMARKS.md or docs/RESULTS.md."""
