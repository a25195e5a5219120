"""The search half of ``cl sweep`` (``--search tpe|random``) and the ``cl search-worker`` command
that each local worker process runs.

Thin: :mod:`cltool.search` validates and writes the sweep folder, :mod:`cltool.search_worker`
asks, trains and tells, :mod:`cltool.launch` starts the workers. Optuna and torch are imported
only once a search runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cltool.cli_common import one_line_errors, print_job_script, stop_announcer
from cltool.errors import CLToolError, InputError
from cltool.signals import StopFlag
from cltool.slurm_options import SlurmOptions
from cltool.text import plural

if TYPE_CHECKING:
    from cltool.search import Search

#: ``cl sweep`` flags that only a search takes.
SEARCH_FLAGS = ("trials", "objective", "direction", "pruner", "workers")


def refuse_search_flags(flags: dict[str, Any], params: list[str]) -> None:
    """A grid sweep given a search's flag or a distribution: one line saying to add --search."""
    from cltool.search_space import is_distribution

    given = [name for name in SEARCH_FLAGS if flags.get(name) is not None]
    if given:
        raise InputError(f"--{given[0]}: only a search takes it; add --search tpe|random")
    for text in params:
        if is_distribution(text):
            key = text.partition("=")[0]
            raise InputError(
                f"--param {text}: a range A..B is searched, which needs --search tpe|random "
                f"--trials N; a grid range is A..B:lin:N, A..B:log:N or A..B:xF, e.g. "
                f"{key}=0.1..0.5:lin:5"
            )


def describe_search(search: Search) -> str:
    """``search ID: tpe, 30 trials, maximize knn_top1, pruner hyperband``."""
    settings = search.settings
    return (
        f"search {search.sweep_id}: {settings.sampler}, {plural(settings.trials, 'trial')}, "
        f"{settings.direction} {settings.objective}, pruner {settings.pruner}"
    )


def space_table(search: Search) -> Table:
    """The space of a search (``--dry-run``): each key and what it is searched over."""
    table = Table()
    table.add_column("key")
    table.add_column("searched over")
    for param in search.space:
        table.add_row(param.key, param.describe().partition("=")[2])
    return table


def run_search(
    console: Console,
    recipe: Path,
    *,
    flags: dict[str, Any],
    params: list[str],
    zips: list[str],
    seeds: int | None,
    overrides: list[tuple[str, Any]],
    out: Path,
    executor: str,
    jobs: int,
    workers: int | None,
    slurm: SlurmOptions,
    array_parallelism: int | None,
    dry_run: bool,
) -> None:
    """Validate the search, write its folder and work it here (``--jobs`` workers) or on SLURM
    (an array of ``--workers`` workers)."""
    from cltool import launch
    from cltool.search import (
        compile_search,
        monitor_note,
        summary_line,
        trials_to_come,
        write_search,
    )

    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: needs at least 1")
    if workers is not None and executor != "slurm":
        raise InputError(f"--workers {workers}: is for --executor slurm; here use --jobs {workers}")
    search = compile_search(
        recipe, flags=flags, params=params, zips=zips, seeds=seeds, overrides=overrides
    )
    folder = search.folder(out)
    options = None
    if executor == "slurm":
        options = launch.array_options(search.slurm, str(recipe), slurm, array_parallelism, dry_run)
    note = monitor_note(search)
    if dry_run:
        console.print(describe_search(search), highlight=False, soft_wrap=True)
        console.print(space_table(search))
        if note:
            console.print(f"note: {note}", highlight=False)
        if options is not None:
            count = workers or 1
            script = launch.render_sbatch(folder / "slurm", f"cl-{search.sweep_id}", options, count)
            print_job_script(console, script, f"array of {plural(count, 'worker')}", options)
        console.print(f"dry run: nothing started; sweep folder would be {folder}", soft_wrap=True)
        return
    write_search(search, out)
    if not trials_to_come(folder):  # nothing to start: say so instead of starting idle workers
        console.print(f"search {search.sweep_id}: {summary_line(folder)}", highlight=False)
        _print_next_steps(console, folder)
        return
    if note:
        console.print(f"note: {note}", highlight=False)
    where = f"{plural(workers or 1, 'SLURM worker')}" if options else plural(jobs, "local worker")
    console.print(
        f"search {search.sweep_id}: {plural(search.settings.trials, 'trial')}, {where}; "
        f"cl status {folder}",
        highlight=False,
        soft_wrap=True,
    )
    if options is not None:
        job = launch.submit_search(folder, options, workers or 1)
        kind = "job array" if (workers or 1) > 1 else "job"
        console.print(f"submitted {kind} {job} ({plural(workers or 1, 'worker')})")
        _print_next_steps(console, folder)
        return
    if jobs > 1:
        codes = launch.run_search_workers(folder, jobs, _progress(console, folder))
        if any(codes):
            raise CLToolError(f"a search worker failed: see {folder / 'logs'}")
    else:
        _work_here(console, folder)
    console.print(f"search {search.sweep_id}: {summary_line(folder)}", highlight=False)
    _print_next_steps(console, folder)


def _print_next_steps(console: Console, folder: Path) -> None:
    console.print(
        f"next: cl status {folder} (trials), cl report {folder} (results)",
        highlight=False,
        soft_wrap=True,
    )


def _progress(console: Console, folder: Path) -> Callable[[], None]:
    """A line for each trial as it ends, read from the study (the workers write their own
    lines into the sweep folder's logs/)."""
    from cltool.search import trial_rows
    from cltool.search_space import describe_params

    shown: set[int] = set()

    def tick() -> None:
        for row in trial_rows(folder):
            if row.number in shown or row.state not in ("complete", "pruned", "fail"):
                continue
            shown.add(row.number)
            value = "" if row.value is None else f" {row.value:.4g}"
            console.print(
                f"trial {row.number}: {row.state}{value} ({describe_params(row.params)})",
                highlight=False,
            )

    return tick


def _work_here(console: Console, folder: Path) -> None:
    """One worker in this process; Ctrl-C stops its trial at the next step, resumable."""
    from cltool.run import Interrupted
    from cltool.search_worker import work
    from cltool.signals import exit_code

    stop = StopFlag(stop_announcer(console)).install()
    try:
        work(folder, should_stop=stop, echo=lambda line: console.print(line, highlight=False))
    except Interrupted as err:
        raise CLToolError(
            "search interrupted: rerun the same command to resume", exit_code=exit_code(err.signum)
        ) from None


@one_line_errors()
def search_worker_command(
    folder: Annotated[Path, typer.Argument(help="A search's sweep folder.")],
) -> None:
    """Work a search: take trials from its study and train them until none is left."""
    from cltool.display import RunConsole

    _work_here(RunConsole(), folder)
