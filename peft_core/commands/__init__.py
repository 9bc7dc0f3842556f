"""The ``peft-core`` subcommands, by group; :mod:`peft_core.cli` builds the parser and dispatches.

``data``: data and caches; ``train``: the cell commands; ``report``: selection, aggregation,
reports and analyses; ``tools``: inspection and tooling. No module imports torch at load time.
"""

from __future__ import annotations

import json

from ..errors import InputError


def study_from_arg(arg: str):
    """A study from a config file path or an inline JSON config."""
    from ..config import load_study

    if arg.lstrip().startswith("{"):
        return load_study(json.loads(arg))
    return load_study(arg)



def model_from_json(model, text: str, what: str):
    """``model`` validated from a JSON argument; an invalid one is one InputError line naming ``what``."""
    from pydantic import ValidationError

    from ..grids import format_validation_error

    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        raise InputError(format_validation_error(err, what)) from None
