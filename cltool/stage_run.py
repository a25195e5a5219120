"""One stage from its parent to a finished stage folder, and a pretraining run's stages in order.

:func:`run_stage` is :func:`cltool.run.run_recipe` for a stage: the same lock (one owner), the
same ``state.json`` rule (a true state however it ends), the same resume from the checkpoint, a
finished stage answered at once. Bad input (a parent that is not finished, a fraction that
leaves a class without labels) is refused before anything is written. Torch is imported only
when a stage trains.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from cltool.display import Display, RunConsole
from cltool.errors import CLToolError, InputError
from cltool.lock import LockLost, RunLock
from cltool.recipe import Recipe
from cltool.run import (
    JsonlSink,
    RunOutcome,
    _first_missing,
    _record_failure,
    git_commit,
    package_versions,
    prepare_folder,
    record_interruption,
)
from cltool.runstate import run_state
from cltool.stages import Stage, StageDir
from cltool.track import DONE, FAILED, INTERRUPTED, RUNNING, MetricSink, RunDir, atomic_write_json


def check_parent(run_dir: RunDir, source: str) -> None:
    """A stage starts from a finished run: refuse a missing, unfinished or failed one."""
    if not run_dir.config.is_file():
        raise InputError(
            f"{source}: {run_dir.path} is not a run folder (no config.toml): give a folder "
            "runs/<name>/<run id> that cl run or cl sweep wrote"
        )
    found = run_state(run_dir)
    if found.name != DONE:
        why = f" ({found.reason})" if found.reason else ""
        raise InputError(
            f"{source}: run {run_dir.path.name} is {found.name}{why}: a stage starts from a "
            "finished run; finish it first (cl run on its recipe resumes it)"
        )
    if not run_dir.checkpoint.is_file():
        raise InputError(
            f"{source}: run {run_dir.path.name} has no checkpoint.pt to start from: rerun it "
            "with --force"
        )


def run_stage(
    stage: Stage,
    recipe: Recipe,
    run_dir: RunDir,
    *,
    force: bool = False,
    quiet: bool = False,
    group: str | None = None,
    console: Console | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunOutcome:
    """Train ``stage`` of the finished run ``run_dir`` (trained from ``recipe``) into its stage
    folder, resuming or skipping as the folder says; W&B (when the recipe logs there) in
    ``group``, the parent's group."""
    stage_dir = stage.folder(run_dir)
    if stage_dir.is_done() and not force:
        return RunOutcome(stage_dir, stage_dir.summary(), DONE)
    check_parent(run_dir, f"stage {stage.label}")
    created = _first_missing(stage_dir.path)
    log = stage_dir.log if created is None else None
    display = Display(console or RunConsole(), log_path=log, quiet=quiet)
    lock = RunLock(stage_dir.path, echo=display.message).acquire()
    try:
        if stage_dir.is_done() and not force:  # finished while this process waited
            return RunOutcome(stage_dir, stage_dir.summary(), DONE)
        return _train(
            stage, recipe, run_dir, stage_dir, display, lock, created, force, group, should_stop
        )
    finally:
        lock.release()


def _train(
    stage: Stage,
    recipe: Recipe,
    run_dir: RunDir,
    stage_dir: StageDir,
    display: Display,
    lock: RunLock,
    created: Path | None,
    force: bool,
    group: str | None,
    should_stop: Callable[[], bool],
) -> RunOutcome:
    from cltool.stage_train import StageTrainer
    from cltool.train import StopRequested

    def stop_requested() -> bool:
        lock.ensure_held()
        return should_stop()

    try:
        trainer = StageTrainer(
            stage, recipe, run_dir, stage_dir, display, lambda r: None, stop_requested
        )
    except CLToolError:
        if created is not None:  # bad input: leave nothing behind
            lock.release()
            shutil.rmtree(created, ignore_errors=True)
        raise
    except Exception as err:
        _record_failure(stage_dir, err)
        raise
    prepare_folder(stage_dir, json.dumps(stage.as_json(), indent=2, sort_keys=True) + "\n", force)
    display.log_path = stage_dir.log
    sinks: list[MetricSink] = [JsonlSink(stage_dir.metrics)]
    status, summary = FAILED, None
    try:
        if recipe.wandb.enabled:
            sinks.extend(_wandb(stage, recipe, stage_dir, group, display))

        def log(record: dict[str, Any]) -> None:
            for sink in sinks:
                sink.log(record)
            if record["kind"] != "eval":
                stage_dir.write_state(
                    RUNNING,
                    epoch=record["epoch"] + 1,
                    global_step=record["global_step"],
                    loss=record.get("loss"),
                )

        trainer.log = log
        epochs = stage.settings["epochs"]
        stage_dir.write_state(RUNNING, epochs=epochs, total_steps=trainer.total_steps, reason=None)
        display.message(f"stage {stage.label} {stage.stage_id}: {stage_dir.path}")
        metrics = trainer.run()
        lock.ensure_held()
        summary = {
            "stage_id": stage.stage_id,
            "run_id": stage.run_id,
            "parent": stage.parent_id,
            "kind": stage.kind,
            "fraction": stage.fraction,
            "label": stage.label,
            "column": stage.column,
            **metrics,
            "versions": package_versions(),
            "git_commit": git_commit(),
        }
        atomic_write_json(stage_dir.summary_file, summary)
        status = DONE
        stage_dir.write_state(DONE, epoch=epochs, global_step=metrics["global_step"])
        return RunOutcome(stage_dir, summary, DONE)
    except (StopRequested, KeyboardInterrupt) as err:
        status = INTERRUPTED
        raise record_interruption(
            stage_dir, err, should_stop, trainer.state.global_step, display
        ) from None
    except LockLost:
        raise
    except Exception as err:
        _record_failure(stage_dir, err)
        raise
    finally:
        display.finish()
        for sink in sinks:
            sink.finish(summary, status)


def _wandb(
    stage: Stage, recipe: Recipe, stage_dir: StageDir, group: str | None, display: Display
) -> list[MetricSink]:
    """The stage's W&B run: its own id and config, in its parent's group."""
    from cltool.wandb_log import open_wandb

    init = {
        "id": stage.stage_id,
        "name": f"{stage.run_id}-{stage.column.removesuffix('_top1')}",
        "group": group or stage.run_id,
        "job_type": stage.kind,
        "config": stage.as_json(),
    }
    sink = open_wandb(recipe, stage_dir, echo=display.message, init=init)
    return [sink] if sink is not None else []


def run_stages(
    stages: list[Stage],
    recipe: Recipe,
    run_dir: RunDir,
    *,
    force: bool = False,
    quiet: bool = False,
    group: str | None = None,
    console: Console | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    announce: Callable[[Stage, RunOutcome], None] = lambda stage, outcome: None,
) -> list[RunOutcome]:
    """The stages in order (each after its parent: :func:`cltool.stages.plan_stages` orders
    them so); ``announce`` hears each one's outcome."""
    outcomes = []
    for stage in stages:
        outcome = run_stage(
            stage,
            recipe,
            run_dir,
            force=force,
            quiet=quiet,
            group=group,
            console=console,
            should_stop=should_stop,
        )
        announce(stage, outcome)
        outcomes.append(outcome)
    return outcomes
