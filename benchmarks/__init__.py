"""Benchmarks: speed, memory and quality figures, written as JSON under docs/results/."""
