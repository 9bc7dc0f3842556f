"""Strict selection of the modules a method touches.

A pattern selects a module path by exact match, by dotted suffix
(``path.endswith("." + pattern)``) or by ``re.fullmatch``; never by substring,
so ``blocks.1`` can not also pick ``blocks.10``. Zero matches raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


#: The linear layers of every timm ViT block, by role: one table for every method that names
#: them (regular expressions over module paths, matched whole by :func:`resolve_targets`).
BLOCK_LINEARS = {
    "qkv": r"blocks\.\d+\.attn\.qkv",
    "proj": r"blocks\.\d+\.attn\.proj",
    "fc1": r"blocks\.\d+\.mlp\.fc1",
    "fc2": r"blocks\.\d+\.mlp\.fc2",
}


def _matches(path: str, pattern: str) -> bool:
    return path == pattern or path.endswith("." + pattern) or re.fullmatch(pattern, path) is not None


def resolve_targets(
    model: nn.Module,
    patterns: Iterable[str],
    module_type: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Module,
) -> list[tuple[str, nn.Module]]:
    """Modules of ``module_type`` whose path matches one of ``patterns``, in model order."""
    patterns = list(patterns)
    found = [
        (path, mod)
        for path, mod in model.named_modules()
        if path and isinstance(mod, module_type) and any(_matches(path, p) for p in patterns)
    ]
    if not found:
        kind = module_type.__name__ if isinstance(module_type, type) else str(module_type)
        raise ValueError(f"no {kind} module of {type(model).__name__} matches {patterns}")
    return found


def transformer_blocks(model: nn.Module) -> nn.Sequential:
    """The ``blocks`` container of a timm Vision Transformer."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"{type(model).__name__} is not a timm ViT (no .blocks)")
    return blocks
