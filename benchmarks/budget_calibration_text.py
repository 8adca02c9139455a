"""Budget calibration of the text tier (`bench perf budget_calibration_text`): budget_calibration's measurement of
the text methods that take a budget, at the default preset on fashion-mnist-text."""

from benchmarks.budget_calibration import run_text as run
from benchmarks.budget_calibration import table

__all__ = ["run", "table"]
