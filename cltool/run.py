"""One run from a recipe to a finished run folder: the function behind ``cl run``.

Sweeps, SLURM tasks and tests call :func:`run_recipe` directly. It is idempotent: a finished run
returns its summary, an unfinished one resumes from its checkpoint, so re-running the same command
after a crash, a ``kill -9`` or a SLURM requeue carries on where the run stopped.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console

from cltool import dist
from cltool.display import Display
from cltool.errors import CLToolError
from cltool.recipe import Recipe, to_toml
from cltool.signals import StopFlag
from cltool.track import (
    DONE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    MetricSink,
    RunDir,
    atomic_write_json,
    atomic_write_text,
)


@dataclass(frozen=True)
class RunOutcome:
    run_dir: RunDir
    summary: dict[str, Any] | None
    status: str


class Interrupted(Exception):
    """The run stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint."""


class JsonlSink:
    """Appends each record to ``metrics.jsonl`` and closes it again, so a crash loses at most a
    line and a resume that rewrites the file (dropping records past the checkpoint) is seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any] | None, status: str) -> None:
        """Nothing is held open."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("cltool", "torch", "torchvision", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The commit of the code that ran, when it runs from a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def prepare_run_dir(run_dir: RunDir, recipe: Recipe, force: bool) -> None:
    if force and run_dir.path.exists():
        shutil.rmtree(run_dir.path)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if not run_dir.config.exists():
        atomic_write_text(run_dir.config, to_toml(recipe))


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    force: bool = False,
    quiet: bool = False,
    sweep_id: str | None = None,
    swept: dict[str, Any] | None = None,
    console: Console | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunOutcome:
    """Train ``recipe`` into ``out/<name>/<run id>/``, resuming or skipping as the folder says.

    Raises :class:`CLToolError` for problems a user can fix (nothing is written when they show
    before training starts), :class:`Interrupted` when ``should_stop`` turned true.

    In a process group (the environment names a world size above one) every rank trains and
    resumes from the checkpoint; rank 0 alone writes the folder and shows progress.
    """
    from cltool.train import StopRequested, Trainer, resolve_device

    console = console or Console(stderr=False)
    run_dir = RunDir.for_run(Path(out), recipe.name, recipe.fingerprint)
    if run_dir.is_done() and not force:
        return RunOutcome(run_dir, run_dir.summary(), DONE)

    # Everything that can fail on bad input (data, device, model) happens before any file exists.
    dist.init_from_env(resolve_device(recipe.train.device))
    if not dist.is_main():
        return _run_other_rank(recipe, run_dir, should_stop)
    display = Display(console, log_path=None, quiet=quiet)
    trainer = Trainer(recipe, run_dir, display, log=lambda record: None, should_stop=should_stop)
    prepare_run_dir(run_dir, recipe, force)
    dist.barrier()  # the other ranks look for a checkpoint once --force has removed the old one
    display.log_path = run_dir.log
    sinks: list[MetricSink] = [JsonlSink(run_dir.metrics)]
    if recipe.wandb.enabled:
        from cltool.wandb_log import open_wandb

        sink = open_wandb(recipe, run_dir, sweep_id, swept, echo=display.message)
        if sink is not None:
            sinks.append(sink)

    def log(record: dict[str, Any]) -> None:
        for sink in sinks:
            sink.log(record)
        if record["kind"] != "eval":
            run_dir.write_state(
                RUNNING,
                epoch=record["epoch"],
                epochs=recipe.train.epochs,
                global_step=record["global_step"],
                total_steps=trainer.total_steps,
                loss=record.get("loss"),
            )

    trainer.log = log
    run_dir.write_state(
        RUNNING, epochs=recipe.train.epochs, total_steps=trainer.total_steps, error=None
    )
    display.message(f"run {recipe.fingerprint}: {run_dir.path}")
    status, summary = FAILED, None
    try:
        metrics = trainer.run()
        summary = {
            "run_id": recipe.fingerprint,
            "name": recipe.name,
            "method": recipe.method,
            "world_size": trainer.world_size,
            **metrics,
            "versions": package_versions(),
            "git_commit": git_commit(),
        }
        atomic_write_json(run_dir.summary_file, summary)
        status = DONE
        run_dir.write_state(DONE, epoch=recipe.train.epochs, global_step=metrics["global_step"])
        return RunOutcome(run_dir, summary, DONE)
    except (StopRequested, KeyboardInterrupt):
        status = INTERRUPTED
        run_dir.write_state(INTERRUPTED)
        display.message("interrupted: the last checkpoint is kept; run the same command to resume")
        raise Interrupted from None
    except Exception as err:
        run_dir.write_state(FAILED, error=f"{err.__class__.__name__}: {err}")
        if not isinstance(err, CLToolError):
            import traceback

            with run_dir.log.open("a", encoding="utf-8") as handle:
                traceback.print_exc(file=handle)
        raise
    finally:
        display.finish()
        for sink in sinks:
            sink.finish(summary, status)


def _run_other_rank(recipe: Recipe, run_dir: RunDir, should_stop: Callable[[], bool]) -> RunOutcome:
    """A rank other than 0: trains in step with rank 0, writes nothing, shows nothing; done
    when its training is (the summary is rank 0's)."""
    from cltool.train import StopRequested, Trainer

    display = Display(Console(quiet=True), log_path=None, quiet=True)
    trainer = Trainer(recipe, run_dir, display, log=lambda record: None, should_stop=should_stop)
    dist.barrier()  # rank 0 has prepared the folder
    try:
        trainer.run()
    except (StopRequested, KeyboardInterrupt):
        raise Interrupted from None
    return RunOutcome(run_dir, None, DONE)


def run_rank(recipe: Recipe, out: Path, force: bool, quiet: bool) -> None:
    """One process of ``cl run --nproc N``: the run, stopped with the others by Ctrl-C or
    SIGTERM at a step boundary, then leave the process group."""
    try:
        run_recipe(recipe, out, force=force, quiet=quiet, should_stop=StopFlag().install())
    except Interrupted:
        pass
    finally:
        dist.shutdown()
