"""The ``cl eval`` command, and the stages part of ``cl run``: fine-tuning, the linear probe,
supervised-from-scratch and distillation on a finished run (:mod:`cltool.stages`).

Everything a stage needs is checked before anything is written: the run is finished, the head
layer exists, every label fraction is in (0, 1] and labels every class, ``--set`` names stage
keys only and never another data set or image size. Torch is imported only to train.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cltool.cli_common import one_line_errors, stop_announcer
from cltool.display import RunConsole
from cltool.errors import InputError
from cltool.recipe import STAGE_TABLES, parse_assignment, parse_value

if TYPE_CHECKING:
    from cltool.recipe import Recipe
    from cltool.run import RunOutcome
    from cltool.stages import Stage
    from cltool.track import RunDir

console = RunConsole()


def parse_fractions(text: str) -> list[float]:
    """``0.01,0.1`` as label fractions, each in (0, 1]."""
    fractions = []
    for item in text.split(","):
        value = parse_value(item.strip())
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"--finetune {text}: '{item.strip()}' is not a number, e.g. 0.01,0.1")
        if not 0 < value <= 1:
            raise InputError(
                f"--finetune {text}: label fraction {value} is outside (0, 1]: give a share of "
                "the training images, e.g. 0.01 for 1%"
            )
        fractions.append(float(value))
    return fractions


def stage_overrides(recipe: Recipe, assignments: list[str]) -> list[tuple[str, Any]]:
    """``--set`` of ``cl eval``: stage keys only; a data key the run was not trained with is a
    mismatch (a stage fine-tunes on its parent's data set, at its image size)."""
    overrides = []
    for text in assignments:
        key, value = parse_assignment(text)
        table = key.partition(".")[0]
        if table == "data":
            trained = getattr(recipe.data, key.partition(".")[2])
            if value != trained:
                raise InputError(
                    f"--set {text}: the run was trained with {key} = {trained!r}; a stage "
                    "starts from its encoder on the same data set and image size: drop it, or "
                    "pretrain a run with it"
                )
            continue
        if table not in STAGE_TABLES:
            raise InputError(
                f"--set {text}: cl eval sets stage keys only (stages.*, finetune.*, distill.*; "
                "`cl keys` lists them); the run's own keys are fixed by its folder"
            )
        overrides.append((key, value))
    return overrides


def check_stage_inputs(recipe: Recipe, kinds: list[str], source: str) -> None:
    """What a run's stages need that a recipe's types cannot say: an existing head layer and
    label fractions that keep every class (this loads the data set's labels)."""
    from cltool.stages import check_start_layer, plan_stages

    check_start_layer(recipe, source)
    stages = plan_stages(recipe, kinds)
    if not stages:
        return
    from cltool.data import load_dataset
    from cltool.labels import check_fraction

    labels = load_dataset(recipe.data).train_y.numpy()
    for fraction in dict.fromkeys(stage.fraction for stage in stages):
        check_fraction(labels, fraction, source)


def stage_table(title: str, outcomes: list[tuple[Stage, RunOutcome]]) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in (("stage", "left"), ("id", "left"), ("top-1", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("labelled", justify="right")
    table.add_column("wall", justify="right")
    for stage, outcome in outcomes:
        summary = outcome.summary or {}
        top1 = summary.get("top1")
        teacher = summary.get("teacher_top1")
        text = f"{top1:.2f} %" if top1 is not None else ""
        if teacher is not None:
            text += f" (teacher {teacher:.2f} %)"
        wall = summary.get("wall_s")
        table.add_row(
            stage.label,
            stage.stage_id,
            text,
            str(summary.get("num_labelled", "")),
            f"{wall:.1f} s" if wall is not None else "",
        )
    return table


def train_stages(
    recipe: Recipe,
    run_dir: RunDir,
    kinds: list[str],
    *,
    force: bool,
    quiet: bool,
    should_stop: Callable[[], bool],
) -> None:
    """Run the stages here, one after the other; a stop signal exits with its shell code."""
    from cltool.run import Interrupted
    from cltool.signals import exit_code
    from cltool.stage_run import run_stages
    from cltool.stages import column_clashes, plan_stages

    done: list[tuple[Stage, RunOutcome]] = []

    def announce(stage: Stage, outcome: RunOutcome) -> None:
        done.append((stage, outcome))
        if not quiet:
            top1 = (outcome.summary or {}).get("top1")
            console.print(f"stage {stage.label}: top-1 {top1:.2f} %", highlight=False)

    stages = plan_stages(recipe, kinds)
    if not quiet:
        for line in column_clashes(stages, run_dir):
            console.print(line, highlight=False, soft_wrap=True)
    try:
        run_stages(
            stages,
            recipe,
            run_dir,
            force=force,
            quiet=quiet,
            console=console,
            should_stop=should_stop,
            announce=announce,
        )
    except Interrupted as stop:
        raise typer.Exit(exit_code(stop.signum)) from None
    if not quiet:
        console.print(stage_table(f"stages of run {run_dir.path.name}", done))


@one_line_errors()
def eval_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A finished run folder: OUT/<name>/<run id>.", show_default=False)
    ],
    finetune: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune on these label fractions, e.g. `0.01,0.1` (also the fractions of "
            "--linear and --supervised)."
        ),
    ] = None,
    linear: Annotated[
        bool, typer.Option("--linear", help="A linear probe on the same labelled images.")
    ] = False,
    supervised: Annotated[
        bool,
        typer.Option(
            "--supervised", help="The same network from scratch on the same labels and budget."
        ),
    ] = False,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill",
            help="Distil the network fine-tuned on distill.fraction into a student "
            "(distill.backbone, distill.width).",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="A stage key: `finetune.lr=0.1`, `distill.width=16`. Repeatable."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Train the stages again.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
) -> None:
    """Fine-tune, probe, train from scratch or distil from a finished run: SimCLR v2's steps
    after pretraining, and the semi-supervised protocol, on a run of any method.

    Each stage has its own folder `RUN_DIR/stages/<stage id>/` and resumes like a run. Without
    a stage flag, the run's own `stages.run` list is run.

    Examples:

        cl eval runs/simclr_v2/3f2a9c01de --finetune 0.01,0.1 --supervised --distill

        cl eval runs/moco/ab12cd34ef --finetune 0.1 --set finetune.start_layer=0

        cl eval runs/simclr_v2/3f2a9c01de --distill --set distill.width=16
    """
    from cltool.recipe import read_toml, resolve
    from cltool.signals import StopFlag
    from cltool.stage_run import check_parent
    from cltool.track import RunDir

    run = RunDir(run_dir)
    check_parent(run, str(run_dir))
    trained = resolve(read_toml(run.config), source=str(run.config), default_name="run")
    overrides = stage_overrides(trained, list(set_ or []))
    if finetune is not None:
        overrides.append(("stages.fractions", parse_fractions(finetune)))
    recipe = resolve(
        read_toml(run.config), overrides, source=str(run.config), default_name=trained.name
    )
    kinds = [k for k, on in (("linear", linear), ("supervised", supervised)) if on]
    kinds = (
        (["finetune"] if finetune is not None else []) + kinds + (["distill"] if distill else [])
    )
    kinds = kinds or list(recipe.stages.run)
    if not kinds:
        raise InputError(
            f"{run_dir}: no stage asked for: give --finetune FRACTIONS, --linear, --supervised "
            "or --distill (or set stages.run in the recipe)"
        )
    check_stage_inputs(recipe, kinds, f"cl eval {run_dir}")
    stop = StopFlag(stop_announcer(console)).install()
    train_stages(recipe, run, kinds, force=force, quiet=quiet, should_stop=stop)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the ``cl`` app."""
    app.command("eval")(eval_command)
