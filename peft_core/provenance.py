"""Where every number's data came from: a record beside each decoded cache, carried into every row.

``peft-core cache`` writes ``<cache>.source.json`` beside the cache: the
listing it decoded (path and sha256), its layout, the preparation manifest
found beside the listing (``manifest.json``, written by ``prepare-manyshot``
and ``prepare-fgvc``: its sha256 and ``format``), the image size and the
resize filter. A cell copies the record of each cache it reads into
``metrics.json`` (``inputs.<role>.source``, :func:`peft_core.fingerprint.cell_inputs`);
``results.parquet`` gets one column per field and role, and the report's
header states them and warns when one table mixes data manifests, listings or
checkpoints (:func:`provenance_summary`). Normalisation is part of the cell's
spec, so it is a column too. So are what computed a row: its code stamp (the
checksum of the engine + method sources that trained it, by which packs reuse
cells) and the torch and peft-core versions; the header warns when one
method's rows carry two code stamps, or the table two library versions.

The record is provenance, not identity: a cell is reused by the content
fingerprints of its caches and checkpoint (unchanged), so a cache rebuilt
from a new listing with the same images keeps its cells, and their rows
show the record they were trained with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import write_json

if TYPE_CHECKING:  # pandas only where a report is made: a training process does not import it
    import pandas as pd

MANIFEST = "manifest.json"
ROLES = ("train", "eval")
FIELDS = ("listing_sha256", "manifest_sha256", "source_format")


def source_path(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".source.json")


def _sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing_sha(listing: Path) -> str | None:
    if listing.is_file():
        return _sha_file(listing)
    if listing.is_dir():  # imagefolder: its sorted relative file names stand for it
        names = sorted(str(p.relative_to(listing)) for p in listing.rglob("*") if p.is_file())
        return hashlib.sha256("\n".join(names).encode()).hexdigest()
    return None


def source_record(listing: Path, layout: str, image_size: int, interpolation: str) -> dict[str, Any]:
    """The record of one decoded split (see the module docstring)."""
    listing = Path(listing)
    folder = listing if listing.is_dir() and layout != "imagefolder" else listing.parent
    manifest = folder / MANIFEST
    fmt = None
    if manifest.is_file():
        try:
            record = json.loads(manifest.read_text())
            fmt = record.get("format")
            # prepare-vtab names the raw source it read (tfds, eurosat-folder, cifar-binary, ...)
            if fmt and record.get("source_format"):
                fmt = f"{fmt} from {record['source_format']}"
        except (ValueError, AttributeError):
            fmt = "unreadable manifest"
    return {
        "listing": str(listing),
        "listing_sha256": _listing_sha(listing),
        "layout": layout,
        "manifest_sha256": _sha_file(manifest) if manifest.is_file() else None,
        "source_format": fmt or f"{layout} listing, no preparation manifest",
        "image_size": image_size,
        "interpolation": interpolation,
    }


def write_source(cache: str | Path, record: dict[str, Any]) -> None:
    write_json(source_path(cache), record)


def read_source(cache: str | Path) -> dict[str, Any] | None:
    """The record beside ``cache``; None for caches built before records were written."""
    path = source_path(cache)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def row_columns(inputs: dict[str, Any]) -> dict[str, Any]:
    """``<role>_<field>`` columns of one cell's ``inputs`` record (None where unrecorded)."""
    out: dict[str, Any] = {}
    for role in ROLES:
        src = (inputs.get(role) or {}).get("source") or {}
        for field in FIELDS:
            out[f"{role}_{field}"] = src.get(field)
    out["prestep_sha256"] = (inputs.get("prestep") or {}).get("sha256")
    return out


def _distinct(values: "pd.Series") -> list[str]:
    return sorted({str(v) for v in values.dropna()})


def provenance_summary(results: "pd.DataFrame") -> dict[str, Any]:
    """What the report header says about the data and checkpoint, and its warnings."""
    import pandas as pd

    final = results[results.stage == "final"] if "stage" in results else results
    get = lambda col: final[col] if col in final else pd.Series(dtype=object)  # noqa: E731
    formats = _distinct(get("train_source_format")) + _distinct(get("eval_source_format"))
    info = {
        "checkpoints": [s[:12] for s in _distinct(get("checkpoint_sha256"))],
        "source_formats": sorted(set(formats)),
        "normalize": _distinct(get("normalize")),
        "image_size": _distinct(get("image_size")),
        "interpolation": _distinct(get("interpolation")),
        "torch": _distinct(get("torch")),
        "peft_core": _distinct(get("peft_core")),
        "warnings": [],
    }
    w = info["warnings"]
    if len(info["checkpoints"]) > 1:
        w.append(f"rows from {len(info['checkpoints'])} different backbone checkpoints: {', '.join(info['checkpoints'])}")
    for col in ("normalize", "image_size", "interpolation"):
        if len(info[col]) > 1:
            w.append(f"rows with different {col}: {', '.join(info[col])}")
    for dataset, g in final.groupby("dataset", sort=False) if len(final) else ():
        for role in ROLES:
            for field, what in (("manifest_sha256", "data manifests"), ("listing_sha256", "split listings")):
                col = f"{role}_{field}"
                n = len(_distinct(g[col])) if col in g else 0
                if n > 1:
                    w.append(f"{dataset}: final rows from {n} different {role} {what}")
            if f"{role}_sha256" in g and len(_distinct(g[f"{role}_sha256"])) > 1:
                w.append(f"{dataset}: final rows from {len(_distinct(g[f'{role}_sha256']))} different {role} data caches")
    for lib in ("torch", "peft_core"):
        if len(info[lib]) > 1:
            w.append(f"rows computed with different {lib} versions: {', '.join(info[lib])}")
    # a method's code stamp covers the engine and that method's files: one study's final rows of
    # one method that carry two stamps were trained by different code (some kept from before an edit)
    for method, g in final.groupby("method", sort=False) if "code_stamp" in final and len(final) else ():
        stamps = _distinct(g["code_stamp"])
        if len(stamps) > 1:
            w.append(f"{method}: final rows from {len(stamps)} different code stamps ({', '.join(stamps)})")
    unstamped = int(final["code_stamp"].isna().sum()) if "code_stamp" in final else len(final)
    if unstamped:
        w.append(f"{unstamped} final rows carry no code stamp (cells trained before it was recorded)")
    unknown = int(get("eval_listing_sha256").isna().sum()) if "eval_listing_sha256" in final else len(final)
    if unknown:
        w.append(f"{unknown} final rows carry no data-source record (cells trained before it was recorded)")
    return info


def provenance_text(info: dict[str, Any]) -> str:
    """One sentence for the report header."""
    parts = [
        f"Data: {'; '.join(info['source_formats']) or 'unrecorded'}",
        f"image size {', '.join(info['image_size']) or '?'} px ({', '.join(info['interpolation']) or '?'} resize)",
        f"normalisation {', '.join(info['normalize']) or '?'}",
        f"backbone checkpoint sha256 {', '.join(info['checkpoints']) or 'unrecorded'}",
    ]
    libs = f"Computed with torch {', '.join(info['torch']) or '?'} and peft-core {', '.join(info['peft_core']) or '?'}"
    return (
        ", ".join(parts)
        + f". {libs}. Every row of results.parquet carries its caches', listings' and manifests' sha256"
        + " and the code stamp of the sources that trained it."
    )
