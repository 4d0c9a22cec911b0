"""What every command prints on the way: step lines, progress bars, warnings and clean errors.

Shared by the ``rapport`` sub-apps; the console writes to standard error, so standard output
stays for the data a command prints (tables, ids).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console

from rapport.features.contracts import DataValidationError, RowsDroppedWarning

console = Console(stderr=True)
T = TypeVar("T")


@contextmanager
def step(message: str) -> Iterator[None]:
    """Show a spinner for one step and print how long it took."""
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[green]✓[/] {message} ({time.perf_counter() - start:.1f} s)")


@contextmanager
def progress_bar(message: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A bar for one long step (counts without a total); yields the function that advances it.

    The bar is transient: when the step ends it gives way to the same ``✓`` line as
    :func:`step`, with how long the step took.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    start = time.perf_counter()
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(message, total=total)
        yield lambda n: bar.advance(task, n)
    console.print(f"[green]✓[/] {message} ({time.perf_counter() - start:.1f} s)")


def run_or_exit(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn input errors into a clean message and exit status 2.

    Warnings raised on the way are printed as one ``warning:`` line each once the recording
    has stopped (printed through :func:`warnings.showwarning` inside it, each would be
    recorded again, without end). Rows dropped on load are left out: the caller prints the
    load's accounting line, which says the same.
    """
    error: Exception | None = None
    with warnings.catch_warnings(record=True) as caught:
        try:
            result = fn()
        except (DataValidationError, ValueError) as err:
            error = err
    for w in caught:
        if not issubclass(w.category, RowsDroppedWarning):
            console.print(f"[yellow]warning:[/] {w.message}")
    if error is not None:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(code=2) from error
    return result
