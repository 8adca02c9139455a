"""Performance benchmarks (not tests): each writes JSON under results/benchmarks/ and prints a table."""

BENCHMARKS = {"sampling": "benchmarks.sampling"}
