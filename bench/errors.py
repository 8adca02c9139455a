"""The one exception type for bad user input: the CLI prints it and exits with code 2."""


class BenchError(Exception):
    """An actionable error about the user's input (a name, a file, a flag)."""


def unknown(kind: str, name: str, valid) -> BenchError:
    """The standard error for an unknown name: it lists the valid ones."""
    return BenchError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
