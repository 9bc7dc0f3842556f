"""Interactive runs: a `rich` progress bar over a cell's epochs (logs stay plain lines otherwise)."""

from __future__ import annotations

from contextlib import contextmanager

from .cells import CellSpec


@contextmanager
def rich_epoch_log(spec: CellSpec):
    """Interactive runs: a `rich` progress bar over epochs (loss, img/s); logs stay plain lines otherwise."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"{spec.dataset}/{spec.method}/{spec.cell_id}"), BarColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("train", total=spec.epochs, status="")

        def log(msg: str) -> None:
            if msg.startswith("epoch "):
                progress.update(task, advance=1, status=msg.split(" ", 2)[2])
            else:
                progress.console.print(msg)

        yield log
