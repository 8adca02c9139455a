"""Performance benchmarks (not tests): each writes JSON under results/benchmarks/ and prints a table."""

BENCHMARKS = {
    "limits": "benchmarks.limits",
    "sampling": "benchmarks.sampling",
    "evaluation": "benchmarks.evaluation",
    "paper_scale": "benchmarks.paper_scale",
    "time_to_forget": "benchmarks.time_to_forget",
    "robustness": "benchmarks.robustness",
    "budget_calibration": "benchmarks.budget_calibration",
    "budget_calibration_text": "benchmarks.budget_calibration_text",
    "text_sweep": "benchmarks.text_sweep",
}
