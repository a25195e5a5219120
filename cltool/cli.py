"""The ``cl`` command: a thin face over the library functions that tests call directly.

Every user error ends as one line on stderr and a non-zero exit code (the rule is in
:mod:`cltool.errors`: 2 for bad input, 1 for a failed run, 130 for an interrupted one), never as
a traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.rich_utils
from rich.markup import escape
from rich.table import Table

from cltool import __version__
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
from cltool.errors import CLToolError
from cltool.slurm_options import SlurmOptions
from cltool.text import plural

if TYPE_CHECKING:
    from cltool.recipe import Recipe
    from cltool.run import RunOutcome
    from cltool.track import RunDir

#: Width of ``--help`` off a terminal. Typer's help is boxes as wide as the console, with
#: option names cut by ``…`` at the 80 columns pipes and SLURM logs get; at this width every
#: help line of every command fits whole. ``TERMINAL_WIDTH`` still wins when set.
HELP_WIDTH = 120
if not sys.stdout.isatty() and "TERMINAL_WIDTH" not in os.environ:
    typer.rich_utils.MAX_WIDTH = HELP_WIDTH

app = typer.Typer(
    name="cl",
    help="Run, sweep and compare contrastive-learning experiments from TOML recipes.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = RunConsole()


def version_callback(value: bool) -> None:
    if value:
        console.print(f"cltool {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Run, sweep and compare contrastive-learning experiments from TOML recipes."""


def summary_table(title: str, summary: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("kNN top-1, trained encoder", "knn_top1", "{:.2f} %"),
        ("kNN top-1, random encoder", "knn_top1_random", "{:.2f} %"),
        ("kNN top-1, raw pixels", "knn_top1_pixels", "{:.2f} %"),
        ("linear probe top-1", "linear_top1", "{:.2f} %"),
        ("epochs", "epochs_done", "{}"),
        ("wall time", "wall_s", "{:.1f} s"),
        ("throughput", "imgs_per_s", "{:.0f} img/s"),
        ("device", "device", "{}"),
    ]
    for label, key, fmt in rows:
        if summary.get(key) is not None:
            table.add_row(label, fmt.format(summary[key]))
    return table


@app.command()
@one_line_errors()
@slurm_flags
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.", show_default=False)],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a key: dotted (`optim.lr=0.1`) or short (K, m, T, epochs, "
            "batch_size, seed, lr). Values are TOML literals. Repeatable.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Root folder of run folders.")] = Path(
        "runs"
    ),
    force: Annotated[bool, typer.Option(help="Start over even if the run exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    wandb: Annotated[
        bool | None,
        typer.Option("--wandb/--no-wandb", help="Log to Weights & Biases (default: the recipe)."),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes on this machine (torch.distributed: gloo on CPU, NCCL on GPUs); "
            "train.batch_size is the global batch, split across them.",
        ),
    ] = 1,
    executor: Annotated[
        str,
        typer.Option(
            help="local, or slurm: submit the run as one SLURM job (through submitit) and return."
        ),
    ] = "local",
    nodes: Annotated[
        int | None,
        typer.Option(
            min=1, help="SLURM nodes of the run (default 1).", rich_help_panel=SLURM_PANEL
        ),
    ] = None,
    *,
    slurm: SlurmOptions,
    dry_run: bool,
) -> None:
    """Train one recipe, evaluate it and print a summary.

    The run lives in `OUT/<recipe name>/<run id>/`; the run id is a hash of the resolved recipe.
    Running the same command again resumes an unfinished run from its last checkpoint and
    only prints the summary of a finished one.

    Examples:

        cl run recipes/moco.toml

        cl run recipes/moco.toml --set m=0.99 --set K=1024 --set T=0.1 --set epochs=5

        cl run recipes/moco.toml --set data.dataset=digits --out /tmp/runs --force

        cl run recipes/moco.toml --nproc 2

        cl run recipes/cifar10/mocov2.toml --executor slurm --nodes 2 --gpus-per-node 4
        --partition gpu --time 8:00:00 --dry-run
    """
    from cltool.recipe import load_recipe, read_toml
    from cltool.track import RunDir

    overrides = list(set_ or [])
    if wandb is not None:
        overrides.append(f"wandb.enabled={'true' if wandb else 'false'}")
    loaded = load_recipe(recipe, overrides)
    run_dir = RunDir.for_run(out, loaded.name, loaded.fingerprint)
    if loaded.stages.run:  # refused now, not after pretraining
        from cltool.cli_eval import check_stage_inputs

        check_stage_inputs(loaded, list(loaded.stages.run), str(recipe))
    if choose(executor, EXECUTORS, "--executor") == "slurm":
        table = SlurmOptions.from_table(read_toml(recipe).get("slurm", {}), str(recipe))
        options = table.overridden_by(replace(slurm, nodes=nodes))
        submit_to_slurm(loaded, out, options, nproc, force=force, dry_run=dry_run)
        return
    if dry_run:
        console.print(
            f"dry run: nothing run; run {loaded.fingerprint} would train in {run_dir.path}",
            highlight=False,
            soft_wrap=True,
        )
        return
    if run_dir.is_done() and not force:  # answered at once: nothing heavy is imported
        if wandb:
            from cltool.cli_common import error_console
            from cltool.wandb_log import log_finished_run

            log_finished_run(loaded, run_dir, echo=lambda line: error_console.print(line))
        summary = run_dir.summary()
    else:
        summary = train_here(loaded, out, nproc, force=force, quiet=quiet)
    if not quiet and summary is not None:
        console.print(summary_table(f"{loaded.name} {loaded.fingerprint}", summary))
        console.print(f"run folder: {run_dir.path}", highlight=False)
    if loaded.stages.run and summary is not None:
        from cltool.cli_eval import train_stages
        from cltool.signals import StopFlag

        stop = StopFlag(stop_announcer(console)).install()
        stages = list(loaded.stages.run)
        train_stages(loaded, run_dir, stages, force=force, quiet=quiet, should_stop=stop)


def train_here(
    recipe: Recipe, out: Path, nproc: int, *, force: bool, quiet: bool
) -> dict[str, Any] | None:
    """Train on this machine; a stop signal exits with its shell code (130, 143, 129), any
    other failure is one line that points at the traceback."""
    from cltool.run import Interrupted

    try:
        outcome = (
            run_local_ranks(recipe, out, nproc, force=force, quiet=quiet)
            if nproc > 1
            else run_stoppable(recipe, out, force=force, quiet=quiet)
        )
    except Interrupted as stop:
        from cltool.signals import exit_code

        raise typer.Exit(exit_code(stop.signum)) from None
    except CLToolError:
        raise
    except Exception as err:
        log = Path(out) / recipe.name / recipe.fingerprint / "train.log"
        raise CLToolError(
            f"run failed: {err.__class__.__name__}: {err} (traceback in {log})"
        ) from None
    return outcome.summary


def run_stoppable(recipe: Recipe, out: Path, *, force: bool, quiet: bool) -> RunOutcome:
    """One process, stopped cleanly by the first Ctrl-C, SIGTERM or SIGHUP."""
    from cltool.run import run_recipe
    from cltool.signals import StopFlag

    stop = StopFlag(stop_announcer(console)).install()
    return run_recipe(recipe, out, force=force, quiet=quiet, console=console, should_stop=stop)


def submit_to_slurm(
    recipe: Recipe, out: Path, options: SlurmOptions, nproc: int, *, force: bool, dry_run: bool
) -> None:
    """Submit one run as one SLURM job of ``nodes`` x ranks per node (``ntasks_per_node``, else
    one per GPU, else ``--nproc``), or with ``dry_run`` print its job script; its run folder
    tells how it goes."""
    from cltool import launch
    from cltool.recipe import check_world_size
    from cltool.run import prepare_run_dir
    from cltool.track import RunDir

    nodes = options.nodes or 1
    tasks = options.ntasks_per_node or options.gpus_per_node or nproc
    options = replace(options, nodes=nodes, ntasks_per_node=tasks)
    check_world_size(recipe, nodes * tasks)
    options.submitit_parameters("check")  # a bad --time fails here, before anything
    run_dir = RunDir.for_run(out, recipe.name, recipe.fingerprint)
    if dry_run:
        script = launch.render_sbatch(
            run_dir.path / "slurm", f"cl-{recipe.fingerprint}", options, 1
        )
        print_job_script(
            console, script, f"{plural(nodes, 'node')} x {plural(tasks, 'task')}", options
        )
        console.print(
            f"dry run: nothing submitted; run {recipe.fingerprint} would train in {run_dir.path}",
            highlight=False,
            soft_wrap=True,
        )
        return
    launch.require_sbatch()
    if force:
        refuse_if_held(run_dir)
        prepare_run_dir(run_dir, recipe, force=True)
    job_id = launch.submit_run(recipe, out, options)
    console.print(
        f"submitted job {job_id}: {plural(nodes, 'node')} x {plural(tasks, 'task')}; "
        f"its run folder: {run_dir.path}",
        highlight=False,
        soft_wrap=True,
    )
    if recipe.stages.run:
        stages_job = launch.submit_run_stages(recipe, out, options, job_id)
        console.print(
            f"submitted job {stages_job}: its stages, once job {job_id} succeeded",
            highlight=False,
        )


def run_local_ranks(
    recipe: Recipe, out: Path, nproc: int, *, force: bool, quiet: bool
) -> RunOutcome:
    """``nproc`` processes of one run; the outcome is read back from rank 0's run folder."""
    import signal

    from cltool.device import check_compile, check_sync_bn, resolve_device
    from cltool.dist import launch_local
    from cltool.recipe import check_world_size
    from cltool.run import Interrupted, RunOutcome, run_rank
    from cltool.track import DONE, RunDir

    check_world_size(recipe, nproc)
    device = resolve_device(recipe.train.device)
    check_sync_bn(recipe, nproc, device)
    check_compile(recipe, device)
    run_dir = RunDir.for_run(Path(out), recipe.name, recipe.fingerprint)
    refuse_if_held(run_dir)  # before starting ranks; rank 0 still takes the lock itself
    signum = launch_local(
        nproc, run_rank, recipe, out, force, quiet, announce_stop=stop_announcer(console)
    )
    if not run_dir.is_done():
        raise Interrupted(signum or signal.SIGINT)
    return RunOutcome(run_dir, run_dir.summary(), DONE)


def refuse_if_held(run_dir: RunDir) -> None:
    """Fail in one line, before any work, when a live process holds the run."""
    from cltool.lock import RunHeld, held_message
    from cltool.runstate import RUNNING, run_state

    found = run_state(run_dir)
    if found.name == RUNNING and found.holder is not None:
        raise RunHeld(held_message(run_dir.path.name, found.holder), found.holder)


@app.command()
def keys() -> None:
    """List every recipe key with its default and allowed values, then the `[sweep]` and
    `[slurm]` tables that `cl sweep` and `cl run --executor slurm` read from a recipe file."""
    from cltool.recipe import describe_keys
    from cltool.slurm_options import describe_slurm_keys
    from cltool.sweep import describe_sweep_keys

    table = Table("key", "default", "meaning")
    for key, default, doc in describe_keys() + describe_sweep_keys() + describe_slurm_keys():
        table.add_row(key, escape(default), escape(doc))  # docs hold [...], not markup
    console.print(table)


def _register_subcommands() -> None:
    """Commands that live in their own modules, added after ``run`` so that ``cl --help`` lists
    the main command first."""
    from cltool.cli_eval import register as register_eval
    from cltool.cli_report import register as register_report
    from cltool.cli_sweep import register as register_sweep

    register_eval(app)
    register_sweep(app)
    register_report(app)


_register_subcommands()
