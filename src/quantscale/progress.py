"""Progress bars for long loops (rich), quiet when QUANTSCALE_PROGRESS=0."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("QUANTSCALE_PROGRESS", "1") != "0"


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate `items` with a progress bar on stderr."""
    if not enabled():
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
