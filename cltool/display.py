"""What a run shows while it trains: a live progress bar on a terminal, plain lines elsewhere.

SLURM log files and pipes get one plain line per epoch (no control codes); ``--quiet`` shows
nothing but errors. Every line also goes to the run's ``train.log``, so a reader that goes away
(``cl run ... | head -1``, a terminal hung up by an SSH disconnect) costs nothing but the
screen: output then goes to ``/dev/null`` and training carries on (:class:`RunConsole`). The
phases without steps (baselines before training, evaluation after) show a spinner with what is
being computed on a terminal, so that a bar standing still at 0 is never all there is to see.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def detach_output() -> None:
    """Point stdout and stderr at ``/dev/null``: their reader is gone, and a write (or the
    flush at exit) would otherwise raise and end the run."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # replaced by a stream with no file descriptor
            continue
    os.close(devnull)


#: Width of output that is not a terminal (pipes, files, SLURM logs): lines keep their natural
#: length, whatever ``COLUMNS`` says, so that no table cell or command is cut or wrapped.
PIPE_WIDTH = 10_000


class RunConsole(Console):
    """A console that survives its reader (rich's default on a closed pipe is to exit) and
    that, off a terminal, prints at natural width (:data:`PIPE_WIDTH`) instead of 80 columns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._natural = kwargs.get("width") is None  # rich takes COLUMNS as a given width

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or not self._natural:
            return size
        return ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def on_broken_pipe(self) -> None:
        self.quiet = True
        detach_output()


class Display:
    def __init__(self, console: Console, log_path: Path | None, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.log_path = log_path
        self.progress: Progress | None = None
        self.task: Any = None

    def _log(self, line: str) -> None:
        if self.log_path is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(f"{stamp} {line}\n")

    def message(self, text: str) -> None:
        self._log(text)
        if not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        """A stretch of work without steps: a spinner with ``text`` on a terminal while it runs,
        one plain line elsewhere (and in ``train.log``)."""
        self._log(text)
        if not self.live:
            if not self.quiet:
                self.console.print(text, highlight=False)
            yield
            return
        with self.console.status(text, spinner="dots"):
            yield
        self.console.print(f"{text}: done", highlight=False)

    def start(self, total_steps: int, done_steps: int, epoch: int) -> None:
        """Show the bar from ``done_steps`` on, in (0-based) ``epoch``."""
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=done_steps, epoch=epoch + 1, loss="-", rate="-"
        )

    def update(self, global_step: int, epoch: int, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=global_step,
                epoch=epoch + 1,
                loss=f"{record['loss']:.4f}",
                rate=f"{record['imgs_per_s']:.0f}",
            )

    def epoch_end(self, epoch: int, epochs: int, record: dict[str, Any]) -> None:
        """The epoch's line; without a rate when this process ran none of its steps (a run
        resumed from a checkpoint written at the epoch's last step)."""
        line = f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}"
        if "imgs_per_s" in record:
            line += f"  {record['imgs_per_s']:.0f} img/s"
        if "knn_top1" in record:
            line += f"  kNN {record['knn_top1']:.1f}%"
        self._log(line)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["global_step"], epoch=epoch + 1)
            if "knn_top1" in record:
                self.progress.console.print(line, highlight=False)
        elif not self.quiet:
            self.console.print(line, highlight=False)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
