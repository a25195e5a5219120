"""The ``cl sweep`` and ``cl status`` commands: thin faces over sweep, launch and status.

Kept out of ``cli.py`` so that the runner half stays in its own modules; ``cli.py`` calls
:func:`register`. Nothing here imports torch: ``cl sweep --dry-run`` and ``cl status`` answer at
once, and training is imported only by the executor that trains.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.table import Table

from cltool.cli_common import (
    EXECUTORS,
    SLURM_PANEL,
    choose,
    one_line_errors,
    print_job_script,
    slurm_flags,
    stop_announcer,
)
from cltool.display import RunConsole
from cltool.errors import CLToolError, InputError
from cltool.signals import StopFlag
from cltool.slurm_options import SlurmOptions
from cltool.text import plural

if TYPE_CHECKING:
    from cltool.status import RunStatus
    from cltool.sweep import Sweep

console = RunConsole()

FORMATS = ("table", "json")
SEARCH_PANEL = "Search (with --search)"


@one_line_errors()
@slurm_flags
def sweep_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (may hold [sweep], [slurm]).")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Swept key: `KEY=v1,v2`, or a range `A..B:lin:N`, `A..B:log:N`, `A..B:xF`. "
            "Repeatable; the runs are the cartesian product.",
        ),
    ] = None,
    zip_: Annotated[
        list[str] | None,
        typer.Option("--zip", help="Keys that move together: `K,T=1024:0.1,4096:0.2`."),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(help="Add train.seed = base seed + 0..N-1 as a dimension.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a key for every run (as in `cl run`)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Root folder of run folders.")] = Path(
        "runs"
    ),
    executor: Annotated[str, typer.Option("--executor", "-e", help="local or slurm.")] = "local",
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Local runs at a time.")] = 1,
    retry_failed: Annotated[bool, typer.Option(help="Also resubmit runs that failed.")] = False,
    array_parallelism: Annotated[
        int | None,
        typer.Option(
            help="At most this many array tasks at once (%N throttle).",
            rich_help_panel=SLURM_PANEL,
        ),
    ] = None,
    search: Annotated[
        str | None,
        typer.Option(
            help="Search instead of a grid: tpe or random (Optuna); each --param is then "
            "`KEY=A..B`, `KEY=A..B:log` or choices `KEY=v1,v2`.",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option(
            help="Trials of the search (re-run with more to extend it).",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="Summary metric the search optimises [default: knn_top1].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    direction: Annotated[
        str | None,
        typer.Option(
            help="maximize or minimize the objective [default: maximize].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    pruner: Annotated[
        str | None,
        typer.Option(
            help="Early stopping on the kNN monitor (eval.every_epochs): halving, hyperband "
            "or none [default: hyperband].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="SLURM: an array of this many search workers [default: 1].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    *,
    slurm: SlurmOptions,
    dry_run: bool,
) -> None:
    """Expand a recipe into a grid of runs and train them here or on SLURM.

    Every run is validated before anything starts; runs are identified by their recipe, so
    re-running the command skips finished runs and leaves running ones alone.

    Examples:

        cl sweep recipes/moco.toml --param m=0.9,0.99,0.999

        cl sweep recipes/moco.toml --param m=0.9,0.99 --param K=1024..16384:x4 --seeds 3 --dry-run

        cl sweep recipes/moco.toml --param lr=1e-3..1e-1:log:5 --executor slurm --partition gpu
        --gpus-per-node 1 --time 4:00:00 --array-parallelism 8

        cl sweep recipes/moco.toml --search tpe --trials 30 --param lr=1e-3..1e-1:log
        --param T=0.05..0.5 --param m=0.9,0.99,0.999 --jobs 2
    """
    from cltool import launch
    from cltool.cli_search import refuse_search_flags, run_search
    from cltool.recipe import parse_assignment, read_toml
    from cltool.status import status_table
    from cltool.sweep import compile_sweep, write_sweep

    choose(executor, EXECUTORS, "--executor")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: needs at least 1")
    flags = {
        "search": search,
        "trials": trials,
        "objective": objective,
        "direction": direction,
        "pruner": pruner,
    }
    file_sweep = read_toml(recipe).get("sweep", {})
    if search is not None or (isinstance(file_sweep, dict) and "search" in file_sweep):
        run_search(
            console,
            recipe,
            flags=flags,
            params=param or [],
            zips=zip_ or [],
            seeds=seeds,
            overrides=[parse_assignment(item) for item in set_ or []],
            out=out,
            executor=executor,
            jobs=jobs,
            workers=workers,
            slurm=slurm,
            array_parallelism=array_parallelism,
            dry_run=dry_run,
        )
        return
    refuse_search_flags({**flags, "workers": workers}, param or [])
    sweep = compile_sweep(
        recipe,
        params=param or [],
        zips=zip_ or [],
        seeds=seeds,
        overrides=[parse_assignment(item) for item in set_ or []],
    )
    check_sweep_stages(sweep)
    options = None
    if executor == "slurm":
        options = launch.array_options(sweep.slurm, str(recipe), slurm, array_parallelism, dry_run)
    plan = launch.make_plan(sweep, out, retry_failed)
    todo = plan.to_submit(sweep)
    folder = sweep.folder(out)
    runs = plural(len(sweep.runs), "run")
    if dry_run:
        title = f"sweep {sweep.sweep_id}: {runs}, {len(todo)} to submit"
        console.print(status_table(plan.statuses, list(sweep.swept_keys), title, plan.actions))
        if options is not None and todo:
            script = launch.render_sbatch(
                launch.slurm_folder(sweep, out), f"cl-{sweep.sweep_id}", options, len(todo)
            )
            print_job_script(console, script, f"array of {plural(len(todo), 'task')}", options)
            console.print(launch.array_table(todo, sweep.swept_keys))
        console.print(f"dry run: nothing submitted; sweep folder would be {folder}", soft_wrap=True)
        return
    if not todo:
        kept = [s for s in plan.statuses if plan.actions[s.run_id] != "skip: done"]
        if not kept:
            console.print(f"sweep {sweep.sweep_id}: all {runs} done ({folder})", highlight=False)
            _print_next_steps(folder)
            return
        console.print(
            f"sweep {sweep.sweep_id}: nothing to submit; "
            + ", ".join(f"{s.run_id} {s.state}" for s in kept)
            + ("" if retry_failed else " (--retry-failed resubmits failed runs)"),
            highlight=False,
        )
        return
    write_sweep(sweep, out)
    console.print(
        f"sweep {sweep.sweep_id}: {runs}, submitting {len(todo)} ({executor}); cl status {folder}",
        highlight=False,
        soft_wrap=True,
    )
    if options is not None:
        arrays = launch.submit_slurm(sweep, todo, out, options)
        console.print(
            f"submitted job array {', '.join(arrays)} ({plural(len(todo), 'task')})",
            highlight=False,
        )
        _print_next_steps(folder)
        return
    if jobs > 1:
        results = launch.run_parallel(sweep, todo, out, jobs, console)
    else:
        stop = StopFlag(stop_announcer(console)).install()
        results = launch.run_serial(sweep, todo, out, console, should_stop=stop)
    failed = [run_id for run_id, status in results.items() if status != "done"]
    if failed:
        raise CLToolError(
            f"{len(failed)} of {plural(len(todo), 'run')} did not finish: cl status {folder}"
        )
    _print_next_steps(folder)


def check_sweep_stages(sweep: Sweep) -> None:
    """Refuse, before anything is written, the stages some run could not train (a head layer
    it lacks, a label fraction that leaves a class empty); each distinct setting is checked
    once, as it loads the data set's labels."""
    from cltool.cli_eval import check_stage_inputs

    checked: set[str] = set()
    for run in sweep.runs:
        recipe = run.recipe
        if not recipe.stages.run:
            continue
        what = (recipe.data, recipe.model, recipe.stages, recipe.finetune, recipe.distill)
        key = json.dumps([dataclasses.asdict(part) for part in what], sort_keys=True)
        if key not in checked:
            checked.add(key)
            check_stage_inputs(recipe, list(recipe.stages.run), str(sweep.source))


def _print_next_steps(folder: Path) -> None:
    """Where a sweep's results are read: the commands, with this sweep's folder filled in."""
    console.print(
        f"next: cl status {folder} (states), cl report {folder} (results)",
        highlight=False,
        soft_wrap=True,
    )


def status_command(
    sweep_dir: Annotated[Path, typer.Argument(help="A sweep folder: OUT/sweeps/<sweep id>.")],
    watch: Annotated[bool, typer.Option(help="Refresh until no run is queued or running.")] = False,
    format_: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Show the state of every run of a sweep: state, epoch, last loss, ETA, job id.

    Exit code: 0 when every run is done (or pruned by its search, and the search has all its
    trials), 3 when any failed, 1 otherwise (queued, running, lost, trials to come).
    Without a terminal, `--watch` waits quietly and prints the final table once.
    """
    from cltool.status import as_json, exit_code, settled, status_table, sweep_status
    from cltool.sweep import load_manifest

    with one_line_errors():
        choose(format_, FORMATS, "--format")
        manifest = load_manifest(sweep_dir)
        swept, sweep_id = manifest.get("swept_keys", []), manifest.get("sweep_id", sweep_dir.name)
        searched = "search" in manifest

        def table(statuses: list[RunStatus]) -> Table:
            """The runs, and for a search its trials (state, values, objective so far)."""
            title = f"sweep {sweep_id} ({manifest.get('definition', {}).get('source', '?')})"
            if not searched:
                return status_table(statuses, swept, title)
            from cltool.search import status_columns, summary_line, trial_rows

            extra = status_columns(sweep_dir, trial_rows(sweep_dir))
            title = f"search {sweep_id}: {summary_line(sweep_dir)}"
            return status_table(statuses, swept, title, extra=extra)

        def to_come() -> bool:
            """A search with trials still to take (between two trials, no run is active)."""
            from cltool.search import trials_to_come

            return searched and trials_to_come(sweep_dir)

        def done_watching(statuses: list[RunStatus]) -> bool:
            return settled(statuses) and not to_come()

        statuses = sweep_status(sweep_dir)
        if watch and format_ == "table" and console.is_terminal:
            with Live(table(statuses), console=console) as live:
                while not done_watching(statuses):
                    time.sleep(interval)
                    statuses = sweep_status(sweep_dir)
                    live.update(table(statuses))
        else:
            while watch and not done_watching(statuses):
                time.sleep(interval)
                statuses = sweep_status(sweep_dir)
            if format_ == "json":
                result = as_json(sweep_id, statuses)
                if searched:
                    from cltool.search import trial_rows

                    result["trials"] = [asdict(row) for row in trial_rows(sweep_dir)]
                print(json.dumps(result, indent=2))
            else:
                console.print(table(statuses))
    code = exit_code(statuses) or int(to_come())
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` and ``status`` to the ``cl`` app."""
    from cltool.cli_search import search_worker_command

    app.command("sweep")(sweep_command)
    app.command("status")(status_command)
    app.command("search-worker", hidden=True)(search_worker_command)
