"""Progress of long loops. On a terminal, a live bar (rich); elsewhere (logs, CI, tests) no bar and no
control codes, only a plain log line at most every PLAIN_INTERVAL_S, so a quick loop prints nothing and a
slow one still shows it is alive."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True)
log = logging.getLogger(__name__)

# Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL_S = 30.0


@contextlib.contextmanager
def progress_bar(
    description: str, *, total: int, unit: str = "steps", transient: bool = False
) -> Iterator[Callable[..., None]]:
    """Yields `advance(status="", steps=1)`: `steps` more of `total` done, with a short live status such as
    the running loss. `transient` bars disappear from the terminal when done."""
    if console.is_terminal:
        columns = (
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=console, transient=transient) as progress:
            task = progress.add_task(description, total=total, status="")

            def advance_bar(status: str = "", steps: int = 1) -> None:
                progress.update(task, advance=steps, status=status)
                progress.refresh()  # a step can take seconds: show it now, not at the next tick

            yield advance_bar
        return

    started = last_line = time.monotonic()
    done = 0

    def advance(status: str = "", steps: int = 1) -> None:
        nonlocal done, last_line
        done += steps
        now = time.monotonic()
        if now - last_line >= PLAIN_INTERVAL_S:
            last_line = now
            log.info(
                "%s: %d/%d %s, %.0f s%s", description, done, total, unit, now - started, f", {status}" if status else ""
            )

    yield advance
