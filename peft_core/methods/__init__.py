"""The PEFT method library: one module per method, registered by name.

Every public module of this package is imported here, so adding a method is
adding one file; nothing else needs editing.
"""

import importlib
import pkgutil

from ._registry import HParams, Method, Prestep, StepHook, get_method, list_methods, register_method

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["HParams", "Method", "Prestep", "StepHook", "get_method", "list_methods", "register_method"]
