"""Progress bars with rates and ETAs on an interactive terminal; nothing extra in logs.

A job's log (`ray job logs`, CI, a file) keeps the one line per epoch, step or generation it always had;
a terminal additionally gets a live bar under those lines: within an epoch, the data preparation, the
soft-label and memory-bank passes, and each method's search. `KESI_PROGRESS=0` turns the bars off,
`KESI_PROGRESS=1` forces them (e.g. in a terminal multiplexer Rich does not recognise).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

__all__ = ["Bar", "bar", "enabled"]


def enabled(console: Console) -> bool:
    flag = os.environ.get("KESI_PROGRESS", "")
    return flag == "1" or (flag != "0" and console.is_terminal)


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "", style="progress.data.speed")


class Bar:
    """One task of a live `rich.progress.Progress` (or nothing, off a terminal)."""

    def __init__(self, progress: Progress | None, task: int | None):
        self.progress, self.task = progress, task

    def advance(self, n: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def update(self, completed: float | None = None, total: float | None = None, description: str | None = None):
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, total=total, description=description)

    def print(self, *args, **kwargs) -> None:
        """Print above the bar (or plainly, off a terminal)."""
        if self.progress is not None:
            self.progress.console.print(*args, **kwargs)


@contextlib.contextmanager
def bar(console: Console, description: str, total: float | None, unit: str = "it") -> Iterator[Bar]:
    """A transient bar "description  ━━━━  M/N  rate  elapsed  ETA" while the block runs."""
    if not enabled(console):
        yield Bar(None, None)
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        transient=True)
    with progress:
        yield Bar(progress, progress.add_task(description, total=total))
