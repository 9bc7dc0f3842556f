"""Split hygiene: do two splits of a data set share an image?

Two listings share an image when one file is listed in both (same resolved
path, so symbolic links and ``a/../b`` spellings count) or when two files
have the same bytes (a copy under another name). Only files whose size occurs
in both listings are hashed, so disjoint splits cost one ``stat`` per image.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import InputError
from .fingerprint import sha256_file


def _paths(entries: Iterable[Path | tuple[Path, int]]) -> list[Path]:
    """Accept image paths or ``(path, label)`` pairs as returned by ``data.split_entries``."""
    return [Path(e[0] if isinstance(e, tuple) else e) for e in entries]


def _sizes(paths: list[Path]) -> list[int]:
    try:
        return [p.stat().st_size for p in paths]
    except FileNotFoundError as err:
        raise InputError(f"{err.filename}: image file not found") from None


def shared_images(
    entries_a: Iterable[Path | tuple[Path, int]], entries_b: Iterable[Path | tuple[Path, int]]
) -> tuple[Path, Path] | None:
    """The first image of ``a`` (in listed order) also in ``b``, as ``(path in a, path in b)``; else None.

    Checked by resolved path first, then by content (sha256 of the file bytes).
    The two paths are equal once resolved when the same file is listed twice.
    """
    a, b = _paths(entries_a), _paths(entries_b)
    resolved_b = {p.resolve(): p for p in b}
    for p in a:
        if p.resolve() in resolved_b:
            return p, resolved_b[p.resolve()]
    size_a, size_b = _sizes(a), _sizes(b)
    common = set(size_a) & set(size_b)
    by_digest: dict[str, Path] = {}
    for p, s in zip(b, size_b):
        if s in common:
            by_digest.setdefault(sha256_file(p), p)
    for p, s in zip(a, size_a):
        if s in common and (q := by_digest.get(sha256_file(p))) is not None:
            return p, q
    return None
