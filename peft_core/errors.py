"""One exception type for every user-facing input error.

The CLI prints ``str(err)`` as a single line and exits with status 2, so the
message must name the offending field or path.
"""


class InputError(ValueError):
    """Bad user input: config field, method name, dataset file, checkpoint."""


def require_files(*paths) -> None:
    """Every given path (``None`` skipped) is an existing file, else an InputError naming the first one missing.

    Called before any compute, so a typo costs a line, not a model build."""
    from pathlib import Path

    for path in paths:
        if path is not None and not Path(path).is_file():
            raise InputError(f"{path}: file not found")
