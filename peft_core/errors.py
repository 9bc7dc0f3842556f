"""One exception type for every user-facing input error.

The CLI prints ``str(err)`` as a single line and exits with status 2, so the
message must name the offending field or path.
"""


class InputError(ValueError):
    """Bad user input: config field, method name, dataset file, checkpoint."""
