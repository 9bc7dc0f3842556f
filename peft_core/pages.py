"""HTML pages from Jinja2 templates (``peft_core/templates/``, package data).

A page is a template fed a few frames turned into *table models* (header + cells with an
optional class) and *figures* (the SVG a figure function drew, inlined so the page opens
offline with no request, plus links to its PDF/SVG/PNG files). No Python string here
holds markup: the templates do.
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("peft_core", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """``templates/<template>`` rendered with ``context`` (autoescaped; undefined names raise)."""
    return environment().get_template(template).render(**context)


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def table_model(
    frame: pd.DataFrame,
    best_cols: list[str] | None = None,
    digits: int = 2,
    eligible: pd.Series | None = None,
    text: pd.DataFrame | None = None,
    second: bool = False,
) -> dict[str, Any]:
    """``frame`` as a table model; the best value of each of ``best_cols`` gets class ``best`` (and,
    with ``second``, the runner-up ``second``), among the ``eligible`` rows only (all by default);
    ``text`` (same index) overrides how cells are shown."""
    pool = frame if eligible is None else frame[eligible.to_numpy(dtype=bool)]
    ranked = {}
    for c in best_cols or []:
        if c in frame and len(pool):
            top = sorted({v for v in pool[c] if isinstance(v, float) and not math.isnan(v)}, reverse=True)[:2]
            ranked[c] = {v: cls for v, cls in zip(top, ("best", "second" if second else ""))}
    rows = []
    for i, r in frame.iterrows():
        ok = eligible is None or bool(eligible.loc[i])
        cells = []
        for c in frame.columns:
            v = r[c]
            cls = ranked.get(c, {}).get(v, "") if ok and isinstance(v, float) else ""
            shown = text.at[i, c] if text is not None and c in text else _fmt(v, digits)
            cells.append({"text": shown, "cls": cls})
        rows.append(cells)
    return {"header": [str(c) for c in frame.columns], "rows": rows}


def render_table(model: dict[str, Any]) -> str:
    """One table model on its own (for pages not yet written as templates)."""
    return environment().get_template("_macros.html.j2").module.table(model)


def inline_svg(path: Path) -> str:
    """The ``<svg>`` element of an SVG file, without its XML prolog, doctype and RDF metadata."""
    text = Path(path).read_text()
    text = text[text.index("<svg") :]
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)


def figure(paths: dict[str, Path], caption: str, label: str, relative_to: Path) -> dict[str, Any]:
    """A figure for the ``figure`` macro: its SVG inlined, its files linked relative to the page."""
    files = {fmt: Path(p).resolve().relative_to(relative_to.resolve()).as_posix() for fmt, p in paths.items()}
    return {"svg": inline_svg(paths["svg"]), "caption": caption, "label": label, "files": files}
