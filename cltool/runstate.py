"""A run's state, defined once: the rule that turns a run folder (and, for a sweep's run, its
last submission and the scheduler's queue) into one state with a one-line reason.

``cl status``, ``cl report``, a sweep's skip/resubmit plan and W&B all ask :func:`run_state`;
none of them reads ``state.json`` on its own. The states:

- ``done``: ``summary.json`` written and ``state.json`` says done
- ``running``: a live holder of the run's lock (:mod:`cltool.lock`), or a SLURM job of the run
  that ``squeue`` calls running
- ``pending``: its SLURM job waits in the queue (first start or a requeue after preemption)
- ``submitted``: submitted, no holder yet, and no scheduler here to ask
- ``interrupted``: stopped on request (Ctrl-C, SIGTERM, SIGHUP, preemption) with a checkpoint
- ``failed``: ended by an error; the reason is its one line
- ``pruned``: stopped early by a search's pruner (:mod:`cltool.search`), checkpoint kept; the
  reason names the epoch and the last value of the objective. Final for the search: the
  scheduler's queue is not asked (its worker goes on to other trials), but a plain ``cl run``
  or grid sweep of the same recipe resumes it to the end
- ``lost``: "running" in the folder but nobody holds it: its process died (``kill -9``, a lost
  node, a job that left the queue)
- ``new``: never started
- ``blocked``: a stage (:mod:`cltool.stages`) that has not run and cannot, because the run or
  stage it starts from failed (or was lost, or interrupted): "blocked by <its id>"

The scheduler is asked only through ``squeue`` (never ``sacct``: many clusters run without
accounting), and only by callers that pass its queue. This module imports no torch.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cltool.lock import Holder, process_alive, read_holder
from cltool.track import DONE, FAILED, INTERRUPTED, RUNNING, RunDir

NEW, PENDING, SUBMITTED, LOST, BLOCKED = "new", "pending", "submitted", "lost", "blocked"
#: Stopped early by a search's pruner (:mod:`cltool.search_worker`): final for its search.
PRUNED = "pruned"
#: Every state, in the order tables list them.
STATES = (DONE, RUNNING, PENDING, SUBMITTED, INTERRUPTED, FAILED, LOST, BLOCKED, NEW, PRUNED)
#: States in which a run is someone's business right now: a re-run leaves them alone.
ACTIVE = frozenset({PENDING, SUBMITTED, RUNNING})
#: squeue states of a job that has not started (again) yet.
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"})


@dataclass(frozen=True)
class RunState:
    """What a run is doing, why (for every state but done and new), and who holds it."""

    name: str
    reason: str | None = None
    holder: Holder | None = None


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


def on_slurm(submissions: list[dict[str, Any]]) -> bool:
    """Whether a run's last submission went to SLURM (then the queue tells pending from lost)."""
    return bool(submissions) and submissions[-1].get("executor") == "slurm"


def run_state(
    run_dir: RunDir,
    submission: Mapping[str, Any] | None = None,
    queue: Mapping[str, str] | None = None,
    now: float | None = None,
) -> RunState:
    """The state of one run, from its folder, its last submission and the scheduler's queue
    (None: not asked or no scheduler)."""
    now = time.time() if now is None else now
    state = run_dir.state() or {}
    status = state.get("status")
    if status == DONE and run_dir.summary() is not None:
        return RunState(DONE)
    slurm = submission is not None and submission.get("executor") == "slurm"
    job = str(submission.get("job_id")) if slurm and submission else None
    holder = read_holder(run_dir.lock_file)
    gone = holder.gone(now) if holder is not None else None
    if holder is not None and job == holder.slurm_job and queue is not None and job not in queue:
        gone = f"its SLURM job {job} left the queue"
    if holder is not None and gone is None:
        return RunState(RUNNING, holder.describe(now), holder)
    if status == PRUNED:
        return RunState(PRUNED, state.get("reason"))
    if job is not None and queue is not None and job in queue:
        if queue[job] in QUEUED:
            return RunState(PENDING, f"SLURM job {job} {queue[job].lower()}")
        return RunState(RUNNING, f"SLURM job {job}")
    if status == RUNNING or gone is not None:
        if gone is not None:
            return RunState(LOST, f"{gone}; run it again to resume from its checkpoint")
        left = f"SLURM job {job} left the queue" if job and queue is not None else None
        return RunState(LOST, f"{left or 'its process ended without a word'}; run it again")
    if status in (FAILED, INTERRUPTED):
        return RunState(status, state.get("reason") or state.get("error"))
    if status == DONE:
        return RunState(LOST, "state.json says done but summary.json is missing; run it again")
    if submission is None:
        return RunState(NEW)
    if slurm:
        if queue is None:
            return RunState(SUBMITTED, f"SLURM job {job}")
        return RunState(LOST, f"SLURM job {job} left the queue before it started")
    # A local process that has not taken the lock yet (still importing torch).
    pid = submission.get("pid")
    if submission.get("host") != socket.gethostname():
        return RunState(SUBMITTED, f"local process {pid} on {submission.get('host')}")
    if isinstance(pid, int) and process_alive(pid, None):
        return RunState(SUBMITTED, f"local process {pid}")
    return RunState(LOST, "its local process ended before it started; run it again")


#: States of a parent that leave its stages waiting for something that will not come by itself.
STOPPED = frozenset({FAILED, LOST, INTERRUPTED})


def stage_state(
    stage_dir: RunDir,
    parent_id: str,
    parent: RunState,
    submission: Mapping[str, Any] | None = None,
    queue: Mapping[str, str] | None = None,
) -> RunState:
    """The state of a stage: a run's state, except that a stage which has not started and
    whose parent (``parent_id`` in state ``parent``) stopped is blocked by it. A SLURM job
    that waits on the parent's job (afterok) is blocked too: its dependency cannot be met."""
    found = run_state(stage_dir, submission, queue)
    if parent.name not in STOPPED or found.name not in (NEW, PENDING, SUBMITTED, LOST):
        return found
    reason = f"blocked by {parent_id} ({parent.name})"
    if found.name == PENDING and submission is not None:
        job = submission.get("job_id")
        reason += f"; its SLURM job {job} waits on a dependency never met: scancel {job}"
    return RunState(BLOCKED, reason)
