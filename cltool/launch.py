"""Executors: how the runs of a compiled sweep get trained.

- local, serial: one run after another in this process, through :func:`cltool.run.run_recipe`.
- local, ``--jobs N``: N ``cl run <recipe> --out OUT --quiet`` subprocesses at a time.
- slurm: one submitit job array per sweep (several above the cluster's MaxArraySize). Each array
  task runs :class:`RunTask` on one run recipe. On SLURM's preemption/timeout signal the task
  stops at the next step boundary with a fresh checkpoint and hands over to submitit, which
  calls :meth:`RunTask.checkpoint` and requeues the job; the requeued task resumes the same run
  (same run id, same folder) from that checkpoint.

A run that fails before its run folder exists (a data set root that is not there, say) still gets
a ``state.json`` saying failed, so that ``cl status`` can report it. Torch is imported only inside
the functions that train.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cltool.errors import CLToolError, InputError
from cltool.recipe import Recipe, short_key
from cltool.runstate import ACTIVE, run_state
from cltool.slurm_options import SlurmOptions
from cltool.status import RunStatus, collect, format_value
from cltool.sweep import RECIPES, PlannedRun, Sweep, record_submissions, run_entries
from cltool.track import DONE, FAILED, INTERRUPTED, RUNNING, RunDir

WILL_SUBMIT = "will submit"
#: ``cl run --quiet`` with this interpreter, whether or not the ``cl`` script is on PATH.
CL_RUN = (sys.executable, "-c", "from cltool.cli import app; app()", "run", "--quiet")
#: SLURM's own default, used when ``scontrol show config`` cannot be read.
DEFAULT_MAX_ARRAY_SIZE = 1001


# -- the plan ---------------------------------------------------------------------------------


def plan_action(state: str, retry_failed: bool) -> str:
    """What launching does with a run in ``state``: done and active runs are left alone; failed
    ones only with ``--retry-failed`` (a deterministic failure would just fail again)."""
    if state == DONE:
        return "skip: done"
    if state in ACTIVE:
        return f"skip: {state}"
    if state == FAILED and not retry_failed:
        return "skip: failed"
    return WILL_SUBMIT


@dataclass(frozen=True)
class Plan:
    statuses: list[RunStatus]
    actions: dict[str, str]

    def to_submit(self, sweep: Sweep) -> list[PlannedRun]:
        return [r for r in sweep.runs if self.actions[r.run_id] == WILL_SUBMIT]


def make_plan(sweep: Sweep, out: Path, retry_failed: bool) -> Plan:
    """Each run's action; a done run whose stages are not all done (nor active) is submitted
    again for them (it answers at once, its stages train)."""
    statuses = collect(Path(out), run_entries(sweep, out))
    actions = {s.run_id: plan_action(s.state, retry_failed) for s in statuses}
    parent = ""
    for s in statuses:
        if s.stage is None:
            parent = s.run_id
        elif actions[parent] == "skip: done" and plan_action(s.state, retry_failed) == WILL_SUBMIT:
            actions[parent] = WILL_SUBMIT
    return Plan(statuses, actions)


# -- running one run --------------------------------------------------------------------------


def mark_failed(run_dir: RunDir, reason: str) -> None:
    """Record a failure that happened before (or outside) the run's own bookkeeping."""
    state = run_dir.state()
    if state is None or state.get("status") != FAILED:
        run_dir.write_state(FAILED, reason=reason)


def run_in_process(
    run: PlannedRun,
    out: Path,
    sweep_id: str | None,
    should_stop: Callable[[], bool] = lambda: False,
) -> str:
    """Train one run here; returns its final status (``running`` when another process holds
    it: that process trains it). Raises ``Interrupted`` when stopped."""
    from cltool.lock import RunHeld
    from cltool.run import Interrupted, one_line, run_recipe

    try:
        outcome = run_recipe(
            run.recipe,
            out,
            quiet=True,
            sweep_id=sweep_id,
            swept=run.params,
            should_stop=should_stop,
        )
    except Interrupted:
        raise
    except RunHeld:
        return RUNNING
    except Exception as err:
        mark_failed(run.run_dir(out), one_line(err))
        return FAILED
    return outcome.status


def run_stages_in_process(
    recipe: Recipe,
    out: Path,
    sweep_id: str | None,
    should_stop: Callable[[], bool] = lambda: False,
) -> str:
    """Train a finished run's stages here, in order; returns done, or failed when a stage
    failed (a stage whose teacher failed is left unwritten: ``cl status`` says blocked).
    Raises ``Interrupted`` when stopped."""
    from cltool.lock import RunHeld
    from cltool.run import Interrupted, one_line
    from cltool.stage_run import run_stage
    from cltool.stages import plan_stages

    run_dir = RunDir.for_run(out, recipe.name, recipe.fingerprint)
    status = DONE
    for stage in plan_stages(recipe):
        try:
            run_stage(stage, recipe, run_dir, quiet=True, group=sweep_id, should_stop=should_stop)
        except Interrupted:
            raise
        except RunHeld:
            continue
        except InputError:
            status = FAILED  # nothing was written: a parent that did not finish
        except Exception as err:
            mark_failed(stage.folder(run_dir), one_line(err))
            status = FAILED
    return status


class _PreemptFlag:
    """Turns submitit's preemption signal into a request to stop at the next step.

    submitit's own handler would checkpoint and exit mid-step; keeping it aside and calling it
    once the trainer has written its checkpoint loses no step.
    """

    def __init__(self) -> None:
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.signum = signal.Signals[f"SIG{name}"]
        self.requested = False
        self.submitit_handler = signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested

    def hand_over(self) -> None:
        """Let submitit checkpoint (``RunTask.checkpoint``), requeue and exit."""
        if callable(self.submitit_handler):
            self.submitit_handler(self.signum, None)


@dataclass(frozen=True)
class RunTask:
    """What one SLURM array task runs: one run of a sweep, from its recipe file.

    Picklable (plain fields); ``checkpoint`` returns the same task, so a requeued job resumes
    the run from its ``checkpoint.pt`` under the same run id.
    """

    recipe_file: str
    out: str
    sweep_id: str | None
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> str:
        from cltool.recipe import load_recipe
        from cltool.run import Interrupted

        run = PlannedRun(load_recipe(self.recipe_file), self.params)
        preempt = _PreemptFlag()
        try:
            status = run_in_process(run, Path(self.out), self.sweep_id, should_stop=preempt)
        except Interrupted:
            preempt.hand_over()
            raise
        if status not in (DONE, RUNNING):  # running: another task of the run trains it
            raise RuntimeError(f"run {run.run_id} {status}: see {run.run_dir(Path(self.out)).log}")
        return status

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class StagesTask(RunTask):
    """What a SLURM stages job runs: the stages of one run of a sweep, submitted to start only
    once the run's own job succeeded (``afterok:<its job id>``)."""

    def __call__(self) -> str:
        from cltool.recipe import load_recipe
        from cltool.run import Interrupted

        recipe = load_recipe(self.recipe_file)
        preempt = _PreemptFlag()
        try:
            status = run_stages_in_process(recipe, Path(self.out), self.sweep_id, preempt)
        except Interrupted:
            preempt.hand_over()
            raise
        if status != DONE:
            raise RuntimeError(f"stages of run {recipe.fingerprint} {status}: see cl status")
        return status


# -- local executors --------------------------------------------------------------------------


def _local_submission(pid: int) -> dict[str, Any]:
    """A local run's submission: the process that trains it, so status can check it lives."""
    return {
        "executor": "local",
        "job_id": str(pid),
        "pid": pid,
        "host": socket.gethostname(),
        "array_index": None,
        "submitted_at": time.time(),
    }


def run_serial(
    sweep: Sweep,
    runs: list[PlannedRun],
    out: Path,
    console: Console,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, str]:
    """Train the runs one after another here; returns run id -> final status."""
    from cltool.run import Interrupted
    from cltool.signals import exit_code

    folder = sweep.folder(out)
    results: dict[str, str] = {}
    for i, run in enumerate(runs, 1):
        record_submissions(folder, {run.run_id: _local_submission(os.getpid())})
        label = _run_label(i, len(runs), run)
        with console.status(f"{label}: training", spinner="dots"):
            try:
                results[run.run_id] = run_in_process(run, out, sweep.sweep_id, should_stop)
                if results[run.run_id] == DONE and run.recipe.stages.run:
                    results[run.run_id] = run_stages_in_process(
                        run.recipe, out, sweep.sweep_id, should_stop
                    )
            except Interrupted as stop:
                raise CLToolError(
                    f"sweep interrupted during run {run.run_id}: rerun the same command to resume",
                    exit_code=exit_code(stop.signum),
                ) from None
        console.print(f"{label}: {_status_text(results[run.run_id])}", highlight=False)
    return results


def run_parallel(
    sweep: Sweep, runs: list[PlannedRun], out: Path, jobs: int, console: Console
) -> dict[str, str]:
    """Train the runs as ``cl run`` subprocesses, ``jobs`` at a time; logs in the sweep folder."""
    folder = sweep.folder(out)
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    waiting = [(_run_label(i, len(runs), run), run) for i, run in enumerate(runs, 1)]
    active, results = {}, {}
    try:
        while waiting or active:
            while waiting and len(active) < jobs:
                label, run = waiting.pop(0)
                log = logs / f"{run.run_id}.log"
                with log.open("ab") as handle:
                    process = subprocess.Popen(
                        [*CL_RUN, str(folder / RECIPES / f"{run.run_id}.toml"), "--out", str(out)],
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                    )
                record_submissions(folder, {run.run_id: _local_submission(process.pid)})
                active[run.run_id] = (label, run, process, log)
            for run_id, (label, run, process, log) in list(active.items()):
                if process.poll() is None:
                    continue
                del active[run_id]
                results[run_id] = _subprocess_status(run, out, process.returncode, log)
                console.print(f"{label}: {_status_text(results[run_id])}", highlight=False)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, _, process, _ in active.values():
            process.send_signal(signal.SIGTERM)  # cl run checkpoints and stops at the next step
        for _, _, process, _ in active.values():
            process.wait()
        raise CLToolError(
            "sweep interrupted: rerun the same command to resume", exit_code=130
        ) from None
    return results


def _subprocess_status(run: PlannedRun, out: Path, returncode: int, log: Path) -> str:
    """A ``cl run`` subprocess's outcome, by its exit code and, where that is not enough,
    by the one definition of a run's state."""
    if returncode == 0:
        return DONE
    if returncode > 128:  # stopped by a signal, checkpoint kept
        return INTERRUPTED
    if run_state(run.run_dir(out)).name == RUNNING:  # exit 2: another process holds the run
        return RUNNING
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    mark_failed(run.run_dir(out), lines[-1] if lines else f"cl run exited with {returncode}")
    return FAILED


def _run_label(index: int, count: int, run: PlannedRun) -> str:
    """``[i/N] <run id> <swept values>``: the same label whether runs go one at a time or
    ``--jobs`` at a time (then in the order they were started)."""
    params = " ".join(f"{short_key(k)}={v}" for k, v in run.params.items())
    return f"[{index}/{count}] {run.run_id} {params}"


def _status_text(status: str) -> str:
    color = {DONE: "green", FAILED: "red"}.get(status, "yellow")
    text = "running elsewhere" if status == RUNNING else status
    return f"[{color}]{text}[/]"


# -- slurm --------------------------------------------------------------------------------------


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it)."""
    try:
        result = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def _chunks(runs: list[PlannedRun], size: int) -> list[list[PlannedRun]]:
    return [runs[i : i + size] for i in range(0, len(runs), size)]


def slurm_folder(sweep: Sweep, out: Path) -> Path:
    return sweep.folder(out) / "slurm"


def require_sbatch() -> None:
    """Refuse ``--executor slurm`` where SLURM is not installed, before anything is written:
    submitit would only fail at submission, after the sweep or run folder exists."""
    if shutil.which("sbatch") is None:
        raise InputError(
            "--executor slurm: no `sbatch` on PATH (SLURM is not installed here): run this on a "
            "SLURM login node, or use --executor local (--dry-run shows the job script anywhere)"
        )


def array_options(
    table: dict[str, Any],
    where: str,
    flags: SlurmOptions,
    array_parallelism: int | None,
    dry_run: bool,
) -> SlurmOptions:
    """The job options of a sweep's or a search's array: the recipe's ``[slurm]`` table under the
    command's flags, checked before anything is written (a bad --time, and no SLURM on this
    machine unless only the dry run's script is asked for)."""
    flags = replace(flags, array_parallelism=array_parallelism)
    options = SlurmOptions.from_table(table, where).overridden_by(flags)
    options.submitit_parameters("check")
    if not dry_run:
        require_sbatch()
    return options


def render_sbatch(folder: Path, job_name: str, options: SlurmOptions, count: int) -> str:
    """The job script submitit would submit from ``folder``: one job, or an array of ``count``
    tasks (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = folder.resolve()
    command = (
        f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    )
    return _make_sbatch_string(
        command=command,
        folder=folder,
        map_count=count if count > 1 else None,
        **options.submitit_parameters(job_name),
    )


def array_table(runs: list[PlannedRun], swept_keys: tuple[str, ...]) -> Table:
    """Which array task trains which run (``$SLURM_ARRAY_TASK_ID`` -> run id -> swept values),
    in the order :func:`submit_slurm` submits them; like the dry run's script, one array (a sweep
    above the cluster's MaxArraySize is split, and each array's indices start at 0)."""
    table = Table(title="array index -> run", title_justify="left")
    table.add_column("index", justify="right")
    table.add_column("run", no_wrap=True)
    for key in swept_keys:
        table.add_column(short_key(key), justify="right")
    for index, run in enumerate(runs):
        table.add_row(str(index), run.run_id, *(format_value(run.params[k]) for k in swept_keys))
    return table


def _sbatch_message(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else err.__class__.__name__
    return text.removeprefix("sbatch: error: ")


def _slurm_executor(folder: Path, options: SlurmOptions, job_name: str) -> Any:
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError:
        raise InputError("--executor slurm: no `srun` here; run on a SLURM login node") from None
    executor.update_parameters(**options.submitit_parameters(job_name))
    return executor


@contextlib.contextmanager
def _sbatch_errors() -> Iterator[None]:
    """sbatch's refusal as one CLToolError line; submitit prints sbatch's stderr before
    raising, which the line already says, so it is swallowed."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            yield
        except (FailedJobError, FailedSubmissionError, OSError) as err:
            raise CLToolError(f"sbatch failed: {_sbatch_message(err)}") from None


def submit_run(recipe: Recipe, out: Path, options: SlurmOptions) -> str:
    """One run as one SLURM job (``nodes`` x tasks per node, one rank per task); returns its job
    id. The task reads the recipe back from the run folder's config, so a requeue resumes the
    same run from its checkpoint."""
    from cltool.run import prepare_run_dir

    out = Path(out).resolve()
    run_dir = RunDir.for_run(out, recipe.name, recipe.fingerprint)
    prepare_run_dir(run_dir, recipe, force=False)
    executor = _slurm_executor(run_dir.path / "slurm", options, f"cl-{recipe.fingerprint}")
    with _sbatch_errors():
        job = executor.submit(RunTask(str(run_dir.config), str(out), None))
    return job.job_id


def submit_slurm(
    sweep: Sweep, runs: list[PlannedRun], out: Path, options: SlurmOptions
) -> list[str]:
    """Submit the runs as job arrays; returns the array job ids. The manifest records every
    task as soon as its array is accepted, so a failure on a later array leaves it true."""
    out = Path(out).resolve()
    folder = sweep.folder(out)
    executor = _slurm_executor(slurm_folder(sweep, out), options, f"cl-{sweep.sweep_id}")
    array_ids = []
    for chunk in _chunks(runs, max_array_size()):
        tasks = [
            RunTask(str(folder / RECIPES / f"{r.run_id}.toml"), str(out), sweep.sweep_id, r.params)
            for r in chunk
        ]
        with _sbatch_errors(), executor.batch():
            jobs = [executor.submit(task) for task in tasks]
        now = time.time()
        records = {}
        for run, job in zip(chunk, jobs, strict=True):
            array_id, _, task = job.job_id.partition("_")
            records[run.run_id] = {
                "executor": "slurm",
                "job_id": job.job_id,
                "array_job_id": array_id,
                "array_index": int(task) if task else None,
                "submitted_at": now,
            }
        record_submissions(folder, records)
        array_ids.append(jobs[0].job_id.partition("_")[0])
        submit_stages(sweep, chunk, out, options, {r: rec["job_id"] for r, rec in records.items()})
    return array_ids


# -- searches -----------------------------------------------------------------------------------

#: ``cl search-worker FOLDER`` with this interpreter: one local worker of a search.
CL_SEARCH_WORKER = (sys.executable, "-c", "from cltool.cli import app; app()", "search-worker")


@dataclass(frozen=True)
class SearchTask:
    """What one SLURM array task of a search runs: a worker of the study in ``folder``.

    On preemption the worker's trial stops at a step boundary with a checkpoint and the task is
    requeued (``checkpoint`` returns the same task); the requeued start takes its trial back
    (:mod:`cltool.search_worker`) and resumes the run.
    """

    folder: str

    def __call__(self) -> dict[int, str]:
        from cltool.run import Interrupted
        from cltool.search_worker import work

        preempt = _PreemptFlag()
        try:
            return work(Path(self.folder), should_stop=preempt, echo=print)
        except Interrupted:
            preempt.hand_over()
            raise

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit_search(folder: Path, options: SlurmOptions, workers: int) -> str:
    """Submit ``workers`` workers of the search in ``folder`` as one job array; its job id."""
    folder = Path(folder).resolve()
    executor = _slurm_executor(folder / "slurm", options, f"cl-{folder.name}")
    with _sbatch_errors(), executor.batch():
        jobs = [executor.submit(SearchTask(str(folder))) for _ in range(workers)]
    return jobs[0].job_id.partition("_")[0]


def run_search_workers(folder: Path, jobs: int, tick: Callable[[], None]) -> list[int]:
    """``jobs`` local workers of the search in ``folder`` as subprocesses (logs in the sweep
    folder's ``logs/``); their exit codes. ``tick`` is called every second meanwhile (to show
    progress). Ctrl-C stops each worker at its next step boundary."""
    logs = Path(folder) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(jobs):
        with (logs / f"worker-{index}.log").open("ab") as handle:
            processes.append(
                subprocess.Popen(
                    [*CL_SEARCH_WORKER, str(folder)], stdout=handle, stderr=subprocess.STDOUT
                )
            )
    try:
        while any(process.poll() is None for process in processes):
            tick()
            time.sleep(1.0)
        tick()
        return [process.returncode for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait()
        raise CLToolError(
            "search interrupted: rerun the same command to resume", exit_code=130
        ) from None


def submit_stages(
    sweep: Sweep,
    runs: list[PlannedRun],
    out: Path,
    options: SlurmOptions,
    parent_jobs: dict[str, str],
) -> None:
    """One job per run with stages, each held until its own run's array task succeeded
    (``afterok:<array job>_<index>``): a stage waits for its parent, not for the sweep. A run
    that fails leaves its stages' job waiting; ``cl status`` calls those stages blocked."""
    folder = sweep.folder(out)
    staged = [run for run in runs if run.recipe.stages.run]
    if not staged:
        return
    executor = _slurm_executor(slurm_folder(sweep, out), options, f"cl-{sweep.sweep_id}-stages")
    records = {}
    for run in staged:
        parent = parent_jobs[run.run_id]
        recipe_file = folder / RECIPES / f"{run.run_id}.toml"
        job_id = _submit_after(
            executor, StagesTask(str(recipe_file), str(out), sweep.sweep_id), parent
        )
        records[run.run_id] = {
            "executor": "slurm",
            "job_id": job_id,
            "array_job_id": job_id,
            "array_index": None,
            "depends_on": parent,
            "submitted_at": time.time(),
        }
    record_submissions(folder, records, field="stage_submissions")


def _submit_after(executor: Any, task: StagesTask, parent_job: str) -> str:
    """Submit ``task`` to start once ``parent_job`` succeeded; returns its job id."""
    executor.update_parameters(dependency=f"afterok:{parent_job}")
    with _sbatch_errors():
        return executor.submit(task).job_id


def submit_run_stages(recipe: Recipe, out: Path, options: SlurmOptions, parent_job: str) -> str:
    """``cl run --executor slurm`` of a recipe with stages: one job for them, held until the
    run's job succeeded; returns its job id."""
    out = Path(out).resolve()
    run_dir = RunDir.for_run(out, recipe.name, recipe.fingerprint)
    single = replace(options, nodes=1, ntasks_per_node=None)  # stages train on one process
    executor = _slurm_executor(run_dir.path / "slurm", single, f"cl-{recipe.fingerprint}-stages")
    return _submit_after(executor, StagesTask(str(run_dir.config), str(out), None), parent_job)
