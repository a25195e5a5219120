"""One run from a recipe to a finished run folder: the function behind ``cl run``.

Sweeps, SLURM tasks and tests call :func:`run_recipe` directly. It is idempotent: a finished run
returns its summary, an unfinished one resumes from its checkpoint, so re-running the same command
after a crash, a ``kill -9`` or a SLURM requeue carries on where the run stopped.
"""

from __future__ import annotations

import json
import platform
import shutil
import signal
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console

from cltool import dist
from cltool.display import Display, RunConsole
from cltool.errors import CLToolError
from cltool.lock import LockLost, RunHeld, RunLock
from cltool.recipe import Recipe, to_toml
from cltool.runstate import PRUNED
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
    """The run stopped on request (a stop signal, a preemption) after writing a checkpoint;
    :attr:`signum` is the signal, whose shell exit code the CLI returns."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    """Create the folder with its ``config.toml``; ``force`` first clears what a previous run
    left (the lock stays: whoever called this holds it, or checked that nobody does)."""
    prepare_folder(run_dir, to_toml(recipe), force)


def prepare_folder(run_dir: RunDir, description: str, force: bool) -> None:
    """Create a run's or a stage's folder with the file that describes it (``run_dir.config``);
    ``force`` first clears everything but the lock. A forced run also drops its stages: they
    started from weights that are gone."""
    if force and run_dir.path.exists():
        for entry in run_dir.path.iterdir():
            if entry.name == run_dir.lock_file.name:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if not run_dir.config.exists():
        atomic_write_text(run_dir.config, description)


def one_line(err: BaseException) -> str:
    """An exception as the one line a state's reason holds."""
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0]}" if text else err.__class__.__name__


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
    prune: Callable[[dict[str, Any]], str | None] | None = None,
) -> RunOutcome:
    """Train ``recipe`` into ``out/<name>/<run id>/``, resuming or skipping as the folder says.

    ``prune`` (a search's trial) sees every epoch record; a reason it returns stops the run at
    that epoch's end, checkpoint kept, in state ``pruned`` with that reason.

    Raises :class:`CLToolError` for problems a user can fix (nothing is written when they show
    before training starts), :class:`~cltool.lock.RunHeld` when another live process trains the
    run, :class:`Interrupted` when ``should_stop`` turned true.

    In a process group (the environment names a world size above one) every rank trains and
    resumes from the checkpoint; rank 0 alone holds the run's lock, writes the folder and shows
    progress.
    """
    run_dir = RunDir.for_run(Path(out), recipe.name, recipe.fingerprint)
    if run_dir.is_done() and not force:
        return RunOutcome(run_dir, run_dir.summary(), DONE)

    from cltool.device import resolve_device

    dist.init_from_env(resolve_device(recipe.train.device))
    created = _first_missing(run_dir.path)
    # A lock can only be taken over in a folder that exists: its train.log records that too.
    log = run_dir.log if created is None and dist.is_main() else None
    display = Display(console or RunConsole(), log_path=log, quiet=quiet or not dist.is_main())
    lock = _hold(run_dir, display.message)
    try:
        # Another process may have finished the run while this one waited for its lock.
        if dist.any_rank(run_dir.is_done() and not force):
            return RunOutcome(run_dir, run_dir.summary(), DONE)
        if lock is None:
            return _run_other_rank(recipe, run_dir, display, should_stop)
        return _train_main(
            recipe, run_dir, display, lock, created, force, sweep_id, swept, should_stop, prune
        )
    finally:
        if lock is not None:
            lock.release()


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what to
    remove to leave nothing behind."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _hold(run_dir: RunDir, echo: Callable[[str], None]) -> RunLock | None:
    """Rank 0 takes the run's lock and every rank learns whether it did, so that all of them
    stop when another process holds the run (the others would wait for rank 0 for ever)."""
    lock, refused = None, None
    if dist.is_main():
        try:
            lock = RunLock(run_dir.path, echo=echo).acquire()
        except RunHeld as err:
            refused = err
        except OSError as err:  # not writable, or a file where a folder should be
            raise CLToolError(
                f"{run_dir.path}: cannot create the run folder ({err.strerror or err}); "
                "give --out a folder you can write",
                exit_code=2,
            ) from None
    if dist.any_rank(refused is not None):
        raise refused or RunHeld(f"run {run_dir.path.name} is held by another process", None)
    return lock


def _train_main(
    recipe: Recipe,
    run_dir: RunDir,
    display: Display,
    lock: RunLock,
    created: Path | None,
    force: bool,
    sweep_id: str | None,
    swept: dict[str, Any] | None,
    should_stop: Callable[[], bool],
    prune: Callable[[dict[str, Any]], str | None] | None,
) -> RunOutcome:
    """Rank 0's part of a run, holding its lock: build, train, write the folder."""
    from cltool.train import StopRequested, Trainer

    pruned: list[str] = []  # the pruner's reason, once it has spoken

    def stop_requested() -> bool:
        lock.ensure_held()  # a run taken over from this process is not written to again
        return bool(pruned) or should_stop()

    try:
        trainer = Trainer(recipe, run_dir, display, log=lambda r: None, should_stop=stop_requested)
    except CLToolError:
        if created is not None:  # bad input: leave nothing behind
            lock.release()
            shutil.rmtree(created, ignore_errors=True)
        raise
    except Exception as err:
        _record_failure(run_dir, err)
        raise
    prepare_run_dir(run_dir, recipe, force)
    dist.barrier()  # the other ranks look for a checkpoint once --force has removed the old one
    display.log_path = run_dir.log
    sinks: list[MetricSink] = [JsonlSink(run_dir.metrics)]
    status, summary = FAILED, None
    try:  # from here on, whatever ends the run leaves its true state in state.json
        if recipe.wandb.enabled:
            from cltool.wandb_log import open_wandb

            sink = open_wandb(recipe, run_dir, sweep_id, swept, echo=display.message)
            if sink is not None:
                sinks.append(sink)

        def log(record: dict[str, Any]) -> None:
            for sink in sinks:
                sink.log(record)
            if prune is not None and record["kind"] == "epoch" and not pruned:
                reason = prune(record)
                pruned.extend([reason] if reason else [])
            if record["kind"] != "eval":
                run_dir.write_state(
                    RUNNING,
                    epoch=record["epoch"],
                    global_step=record["global_step"],
                    loss=record.get("loss"),
                )

        trainer.log = log
        trainer.checkpointed = lambda state: run_dir.write_state(
            RUNNING, global_step=state.global_step, checkpoint_step=state.global_step
        )
        run_dir.write_state(
            RUNNING, epochs=recipe.train.epochs, total_steps=trainer.total_steps, reason=None
        )
        display.message(f"run {recipe.fingerprint}: {run_dir.path}")
        metrics = trainer.run()
        lock.ensure_held()
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
    except (StopRequested, KeyboardInterrupt) as err:
        if pruned and isinstance(err, StopRequested):
            status = PRUNED
            run_dir.write_state(PRUNED, reason=pruned[0])
            display.message(f"pruned: {pruned[0]}")
            return RunOutcome(run_dir, None, PRUNED)
        status = INTERRUPTED
        step = trainer.state.global_step
        raise record_interruption(run_dir, err, should_stop, step, display) from None
    except LockLost:
        raise
    except Exception as err:
        _record_failure(run_dir, err)
        raise
    finally:
        display.finish()
        for sink in sinks:
            sink.finish(summary, status)


def record_interruption(
    folder: RunDir,
    err: BaseException,
    should_stop: Callable[[], bool],
    step: int,
    display: Display,
) -> Interrupted:
    """Write a stopped run's (or stage's) ``interrupted`` state and say so; the exception to
    raise, carrying the signal whose shell exit code the CLI returns."""
    from cltool.train import StopRequested  # torch: imported once training ran

    signum = getattr(should_stop, "signum", None) or signal.SIGINT
    name = signal.Signals(signum).name
    if isinstance(err, StopRequested):
        reason = f"stopped by {name} at step {step}, checkpoint kept"
    else:
        reason = f"aborted by a second {name}; the last checkpoint is kept"
    folder.write_state(INTERRUPTED, reason=f"{reason}; run the same command to resume")
    display.message(f"interrupted: {reason}; run the same command to resume")
    return Interrupted(signum)


def _record_failure(run_dir: RunDir, err: Exception) -> None:
    """``failed`` with the error's one line in ``state.json``; an unexpected error's traceback
    in ``train.log`` (a user error's line says all)."""
    run_dir.write_state(FAILED, reason=one_line(err))
    if not isinstance(err, CLToolError):
        with run_dir.log.open("a", encoding="utf-8") as handle:
            traceback.print_exception(err, file=handle)


def _run_other_rank(
    recipe: Recipe, run_dir: RunDir, display: Display, should_stop: Callable[[], bool]
) -> RunOutcome:
    """A rank other than 0: trains in step with rank 0, writes nothing, shows nothing; done
    when its training is (the summary is rank 0's)."""
    from cltool.train import StopRequested, Trainer

    trainer = Trainer(recipe, run_dir, display, log=lambda record: None, should_stop=should_stop)
    dist.barrier()  # rank 0 has prepared the folder
    try:
        trainer.run()
    except (StopRequested, KeyboardInterrupt):
        raise Interrupted(getattr(should_stop, "signum", None) or signal.SIGINT) from None
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
