"""Atomic writers and the on-disk layout of one cell's outputs.

A cell directory holds ``spec.json`` (what ran), ``predictions.parquet``
(per-sample label, prediction, logits), ``trainable.safetensors`` (the
trained tensors, for merging) and ``metrics.json`` (written last:
its presence means the cell finished). Every file is written to a temporary
name in the same directory and renamed, so a killed job never leaves a
half-written file under the final name. Files get the mode a plain ``open``
would give them (``0o666 & ~umask``), not ``mkstemp``'s 0600, so that on a
shared cluster lab-mates can read results when the user's umask lets them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPEC, METRICS, PREDICTIONS = "spec.json", "metrics.json", "predictions.parquet"
# Trained tensors of the cell (every parameter that trained, head included).
WEIGHTS = "trainable.safetensors"
# A cell's saved training state while it is not finished (preempted, or stopped at a halving rung's budget).
RESUME = "resume.pt"


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere (or Linux < 4.7) set and restore it: another thread creating a
    # file in between would get 0o077 for that file (safe, never looser).
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after writing: a writer may have made the file anew
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so the JSON is standard (a diverged run has no accuracy)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Atomically create ``path`` by calling ``write(temporary_path)``."""
    _atomic(Path(path), write)


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_parquet(path: str | Path, frame: "Any") -> None:
    _atomic(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_torch(path: str | Path, obj: Any) -> None:
    import torch

    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
