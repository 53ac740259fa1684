"""Benchmark harnesses. Speed is measured here and reported as ratios, never asserted in tests."""
