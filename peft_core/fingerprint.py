"""Content fingerprints of what a cell consumed: its data caches and its checkpoint.

A cell's id hashes its *configuration* (peft_core/config.py); the files it reads
are named there by path only. So that a corrected split file or a swapped
checkpoint at the same path cannot leave old numbers in the reports, every cell
records the sha256 of each input it read (``metrics.json`` ``inputs``), and a
finished cell is reused only when all of them match (peft_core/packs.py).

A data cache is fingerprinted by its *content* (shapes, dtypes, image and
label bytes: peft_core/data.cache_fingerprint, stored beside the cache when it
is built), so a rebuilt cache with the same pixels and labels keeps its
fingerprint. A checkpoint is fingerprinted by its bytes; hashing a multi-GB
file on every job would cost more than some cells, so that digest is memoised
in a small JSON file keyed by the file's resolved path, size and modification
time (ns): a ``touch`` rehashes once and finds the same digest; a different
file at the same path has a new mtime and is rehashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import InputError
from .results import write_json

CHUNK = 1 << 22  # 4 MiB reads


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """sha256 of ``path``'s content, memoised in ``memo_dir`` by path, size and mtime."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    key = _stat_key(path)
    memo = None
    if memo_dir is not None:
        name = hashlib.sha256(str(key["path"]).encode()).hexdigest()[:20]
        memo = Path(memo_dir) / f"{name}.json"
        try:
            saved = json.loads(memo.read_text())
            if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
                return saved["sha256"]
        except (OSError, ValueError):
            pass
    digest = sha256_file(path)
    if memo is not None and _stat_key(path) == key:  # unchanged while hashing
        write_json(memo, {**key, "sha256": digest})
    return digest


def cell_inputs(
    train_split: str,
    train_data: str | Path,
    eval_split: str,
    eval_data: str | Path,
    checkpoint: str | Path | None,
    memo_dir: str | Path | None = None,
    prestep: str | Path | None = None,
    features: tuple[str | Path, str | Path] | None = None,
) -> dict[str, dict[str, str | None]]:
    """The ``inputs`` record of a cell: the content fingerprint of each data cache it
    reads and the sha256 of its checkpoint (``memo_dir``: where checkpoint digests are memoised),
    and of its method's prestep result where it has one (peft_core/prestep.py), and of
    the cached features of its train and eval splits where it reads them (peft_core/features.py)."""
    from .data import cache_fingerprint  # data imports this module (hygiene's file hashes)

    from .provenance import read_source

    out = {
        "train": {"split": train_split, "sha256": cache_fingerprint(train_data), "source": read_source(train_data)},
        "eval": {"split": eval_split, "sha256": cache_fingerprint(eval_data), "source": read_source(eval_data)},
        "checkpoint": {
            "path": os.fspath(checkpoint) if checkpoint is not None else None,
            "sha256": fingerprint(checkpoint, memo_dir) if checkpoint is not None else None,
        },
    }
    if prestep is not None:
        out["prestep"] = {"path": os.fspath(prestep), "sha256": sha256_file(prestep)}
    if features is not None:
        from .features import record

        out["features"] = record(*features)
    return out


def changed_inputs(recorded: dict | None, current: dict) -> list[str]:
    """Why a finished cell's inputs differ from the current ones ([] when they match)."""
    if not recorded:
        return ["no input fingerprints recorded"]
    why = []
    for role in ("train", "eval"):
        if (recorded.get(role) or {}).get("sha256") != current[role]["sha256"]:
            why.append(f"{current[role]['split']} changed")
    if (recorded.get("checkpoint") or {}).get("sha256") != current["checkpoint"]["sha256"]:
        why.append("checkpoint changed")
    if "prestep" in current and (recorded.get("prestep") or {}).get("sha256") != current["prestep"]["sha256"]:
        why.append("prestep result changed")
    # features with other bytes retrain, said only when no change above explains them (a
    # changed split or checkpoint changes the features too); a cell trained on the images
    # (no record), or now given none (the cache turned off), has the result of either path
    old, new = recorded.get("features") or {}, current.get("features") or {}
    explained = bool(why)
    for role in ("train", "eval"):
        if role in old and role in new and old[role].get("sha256") != new[role]["sha256"] and not explained:
            why.append(f"{current[role]['split']} features changed")
    return why
