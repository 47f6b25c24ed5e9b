"""Helpers shared by the tests and the benchmarks (multi-process runs on gloo)."""
