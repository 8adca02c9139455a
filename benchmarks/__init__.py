"""Performance benchmarks (not tests): each writes JSON under results/benchmarks/ and prints a table."""

BENCHMARKS = {
    "limits": "benchmarks.limits",
    "sampling": "benchmarks.sampling",
    "paper_scale": "benchmarks.paper_scale",
}
