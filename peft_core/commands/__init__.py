"""The ``peft-core`` subcommands, by group; :mod:`peft_core.cli` builds the parser and dispatches.

``data``: data and caches; ``train``: the cell commands; ``report``: selection, aggregation,
reports and analyses; ``tools``: inspection and tooling. No module imports torch at load time.
"""

from __future__ import annotations

import json


def study_from_arg(arg: str):
    """A study from a config file path or an inline JSON config."""
    from ..config import load_study

    if arg.lstrip().startswith("{"):
        return load_study(json.loads(arg))
    return load_study(arg)

