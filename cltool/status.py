"""Where each run of a sweep stands, read from its run folder and, where there is one, squeue.

A run's own files are the main source: ``state.json`` says running, done, failed or interrupted,
and its heartbeat (``updated_at``, rewritten with every metric line) says whether "running" is
still true. The scheduler is asked only through ``squeue`` (never ``sacct``: many clusters run
without accounting), and only to tell a queued or requeued job from a lost one. States:

- ``new``: never submitted
- ``pending``: waiting in the SLURM queue (first start or a requeue after preemption)
- ``submitted``: submitted, no files yet, and no scheduler here to ask
- ``running``: a live process with a fresh heartbeat, or a job squeue calls running
- ``done`` / ``failed`` / ``interrupted``: as the run folder says
- ``lost``: "running" in the folder but its process or job is gone (killed, node lost)

This module imports no torch, so ``cl status`` answers at once.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from cltool.recipe import short_key
from cltool.sweep import load_manifest, sweep_out
from cltool.track import DONE, FAILED, INTERRUPTED, RUNNING, RunDir

NEW, PENDING, SUBMITTED, LOST = "new", "pending", "submitted", "lost"
#: States in which a run is someone's business right now: a re-run leaves them alone.
ACTIVE = frozenset({PENDING, SUBMITTED, RUNNING})
#: A heartbeat older than this, with no scheduler or process to vouch for it, means lost.
STALE_AFTER_S = 300.0
#: squeue states of a job that has not started (again) yet.
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"})
STATE_STYLE = {DONE: "green", FAILED: "red", LOST: "red", RUNNING: "cyan", PENDING: "yellow"}


@dataclass(frozen=True)
class RunStatus:
    """One row of ``cl status``."""

    run_id: str
    params: dict[str, Any]
    state: str
    epochs_done: int | None
    epochs: int | None
    loss: float | None
    eta_s: float | None
    job_id: str | None
    error: str | None
    executor: str | None = None

    @property
    def job_text(self) -> str:
        """The job column: a SLURM job id as squeue shows it; a local run's process id said as
        one (a bare number reads like a job id)."""
        if self.job_id is None:
            return ""
        return f"local pid {self.job_id}" if self.executor == "local" else self.job_id


def scheduler_states() -> dict[str, str] | None:
    """squeue's view of this user's jobs: ``{"123_4": "RUNNING", ...}``; None when unknown."""
    if shutil.which("squeue") is None:
        return None
    command = ["squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser()]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    rows = (line.split("|", 1) for line in result.stdout.splitlines() if "|" in line)
    return {job.strip(): state.strip() for job, state in rows}


def _process_alive(state: Mapping[str, Any]) -> bool | None:
    """Whether the run's process lives, when it ran on this host; None when we cannot tell."""
    pid = state.get("pid")
    if state.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _still_running(state: Mapping[str, Any], now: float) -> bool:
    alive = _process_alive(state)
    if alive is not None:
        return alive
    return now - float(state.get("updated_at", 0)) < STALE_AFTER_S


def classify(
    run_dir: RunDir,
    submissions: list[dict[str, Any]],
    queue: Mapping[str, str] | None,
    now: float,
) -> str:
    """The state of one run, from its folder, its last submission and the scheduler's queue."""
    if run_dir.is_done():
        return DONE
    state = run_dir.state() or {}
    last = submissions[-1] if submissions else None
    on_slurm = last is not None and last.get("executor") == "slurm"
    if on_slurm and queue is not None:
        queued = queue.get(str(last.get("job_id")))
        if queued is not None:
            return PENDING if queued in QUEUED else RUNNING
    status = state.get("status")
    if status == RUNNING:
        gone_from_queue = on_slurm and queue is not None
        return LOST if gone_from_queue or not _still_running(state, now) else RUNNING
    if status in (FAILED, INTERRUPTED):
        return status
    if status is not None:  # "done" without a summary: the run did not really finish
        return LOST
    if last is None:
        return NEW
    if on_slurm:
        return SUBMITTED if queue is None else LOST
    # A local process that has not written its first state yet (still importing torch).
    return SUBMITTED if _process_alive(last) else LOST


def run_status(
    run_dir: RunDir,
    run_id: str,
    params: dict[str, Any],
    submissions: list[dict[str, Any]],
    queue: Mapping[str, str] | None,
    now: float | None = None,
) -> RunStatus:
    """A row for one run: its state plus progress and a rough ETA from the heartbeat."""
    now = time.time() if now is None else now
    state_name = classify(run_dir, submissions, queue, now)
    state = run_dir.state() or {}
    epochs, step, total = state.get("epochs"), state.get("global_step"), state.get("total_steps")
    epochs_done = eta = None
    if isinstance(epochs, int) and isinstance(step, int) and isinstance(total, int) and total:
        epochs_done = epochs if state_name == DONE else step * epochs // total
        elapsed = float(state.get("updated_at", now)) - float(state.get("started_at", now))
        if state_name == RUNNING and 0 < step < total and elapsed > 0:
            eta = elapsed / step * (total - step)
    loss = state.get("loss")
    return RunStatus(
        run_id=run_id,
        params=params,
        state=state_name,
        epochs_done=epochs_done,
        epochs=epochs if isinstance(epochs, int) else None,
        loss=float(loss) if isinstance(loss, int | float) else None,
        eta_s=eta,
        job_id=str(submissions[-1].get("job_id")) if submissions else None,
        error=state.get("error") if state_name == FAILED else None,
        executor=submissions[-1].get("executor") if submissions else None,
    )


def collect(out: Path, runs: list[dict[str, Any]]) -> list[RunStatus]:
    """Statuses of manifest-style run entries; asks squeue only when some run went to SLURM."""
    queue = None
    if any(r["submissions"] and r["submissions"][-1].get("executor") == "slurm" for r in runs):
        queue = scheduler_states()
    now = time.time()
    return [
        run_status(
            RunDir(out / r["run_dir"]), r["run_id"], r["params"], r["submissions"], queue, now
        )
        for r in runs
    ]


def sweep_status(folder: Path) -> list[RunStatus]:
    """Every run of a sweep folder."""
    return collect(sweep_out(folder), load_manifest(folder)["runs"])


def exit_code(statuses: list[RunStatus]) -> int:
    """0 when every run is done, 3 when any failed, 1 otherwise (still running, lost, new)."""
    states = {s.state for s in statuses}
    if FAILED in states:
        return 3
    return 0 if states <= {DONE} else 1


def settled(statuses: list[RunStatus]) -> bool:
    """True when no run is queued or running: watching longer would show nothing new."""
    return not any(s.state in ACTIVE for s in statuses)


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def status_table(
    statuses: list[RunStatus],
    swept_keys: list[str],
    title: str = "",
    plan: Mapping[str, str] | None = None,
) -> Table:
    """The runs as a table; ``plan`` adds what a sweep would do with each run (dry runs)."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("run", no_wrap=True)
    for key in swept_keys:
        table.add_column(short_key(key), justify="right")
    table.add_column("state", no_wrap=True)
    if plan is not None:
        table.add_column("plan", no_wrap=True)
    progress = ("epoch",) if plan is not None else ("epoch", "loss", "ETA", "job")
    for name in progress:
        table.add_column(name, justify="right")
    for s in statuses:
        style = STATE_STYLE.get(s.state, "")
        state = f"[{style}]{s.state}[/]" if style else s.state
        epoch = f"{s.epochs_done}/{s.epochs}" if s.epochs_done is not None else ""
        loss = f"{s.loss:.4f}" if s.loss is not None else ""
        cells = [s.run_id, *(format_value(s.params.get(k)) for k in swept_keys), state]
        if plan is not None:
            table.add_row(*cells, plan.get(s.run_id, ""), epoch)
        else:
            table.add_row(*cells, epoch, loss, _fmt_eta(s.eta_s), s.job_text)
    counts = Counter(s.state for s in statuses)
    table.caption = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return table


def as_json(sweep_id: str, statuses: list[RunStatus]) -> dict[str, Any]:
    return {
        "sweep_id": sweep_id,
        "counts": dict(Counter(s.state for s in statuses)),
        "exit_code": exit_code(statuses),
        "runs": [asdict(s) for s in statuses],
    }
