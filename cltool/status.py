"""Where each run of a sweep stands: ``cl status``'s rows and tables.

The state of each run comes from :func:`cltool.runstate.run_state` (the one definition every
command shares); this module adds progress, an ETA and the scheduler's queue, asked through
``squeue`` only when some run went to SLURM. It imports no torch, so ``cl status`` answers at
once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from cltool.recipe import short_key
from cltool.runstate import (
    ACTIVE,
    BLOCKED,
    LOST,
    NEW,
    PENDING,
    PRUNED,
    RunState,
    on_slurm,
    run_state,
    scheduler_states,
    stage_state,
)
from cltool.sweep import load_manifest, sweep_out
from cltool.track import DONE, FAILED, RUNNING, RunDir

STATE_STYLE = {
    DONE: "green",
    FAILED: "red",
    LOST: "red",
    BLOCKED: "red",
    RUNNING: "cyan",
    PENDING: "yellow",
    PRUNED: "magenta",
}


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
    reason: str | None
    executor: str | None = None
    #: A stage's label (``finetune 1%``); None for a run.
    stage: str | None = None

    @property
    def job_text(self) -> str:
        """The job column: a SLURM job id as squeue shows it; a local run's process id said as
        one (a bare number reads like a job id)."""
        if self.job_id is None:
            return ""
        return f"local pid {self.job_id}" if self.executor == "local" else self.job_id


def run_status(
    run_dir: RunDir,
    run_id: str,
    params: dict[str, Any],
    submissions: list[dict[str, Any]],
    queue: Mapping[str, str] | None,
    now: float | None = None,
    found: RunState | None = None,
    stage: str | None = None,
) -> RunStatus:
    """A row for one run (or stage, ``found`` its state): its state plus progress and a rough
    ETA from the heartbeat."""
    now = time.time() if now is None else now
    found = found or run_state(run_dir, submissions[-1] if submissions else None, queue, now)
    state_name = found.name
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
        reason=found.reason,
        executor=submissions[-1].get("executor") if submissions else None,
        stage=stage,
    )


def collect(out: Path, runs: list[dict[str, Any]]) -> list[RunStatus]:
    """Statuses of manifest-style run entries; asks squeue only when some run went to SLURM."""
    slurm = any(on_slurm(r["submissions"] + r.get("stage_submissions", [])) for r in runs)
    queue = scheduler_states() if slurm else None
    now = time.time()
    rows = []
    for r in runs:
        row = run_status(
            RunDir(out / r["run_dir"]), r["run_id"], r["params"], r["submissions"], queue, now
        )
        rows.append(row)
        rows.extend(_stage_rows(out, r, row, queue, now))
    return rows


def _stage_rows(
    out: Path,
    entry: dict[str, Any],
    parent: RunStatus,
    queue: Mapping[str, str] | None,
    now: float,
) -> list[RunStatus]:
    """Rows for a run's stages (after its own), each blocked when what it starts from stopped."""
    submissions = entry.get("stage_submissions", [])
    states = {parent.run_id: RunState(parent.state, parent.reason)}
    rows = []
    for stage in entry.get("stages", []):
        stage_dir = RunDir(out / stage["run_dir"])
        parent_state = states.get(stage["parent"], RunState(NEW))
        found = stage_state(
            stage_dir,
            stage["parent"],
            parent_state,
            submissions[-1] if submissions else None,
            queue,
        )
        states[stage["stage_id"]] = found
        rows.append(
            run_status(
                stage_dir,
                stage["stage_id"],
                entry["params"],
                submissions,
                queue,
                now,
                found,
                stage["label"],
            )
        )
    return rows


def sweep_status(folder: Path) -> list[RunStatus]:
    """Every run of a sweep folder."""
    return collect(sweep_out(folder), load_manifest(folder)["runs"])


def exit_code(statuses: list[RunStatus]) -> int:
    """0 when every run is done (or pruned by its search), 3 when any failed, 1 otherwise
    (still running, lost, new)."""
    states = {s.state for s in statuses}
    if FAILED in states:
        return 3
    return 0 if states <= {DONE, PRUNED} else 1


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
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> Table:
    """The runs as a table; ``plan`` adds what a sweep would do with each run (dry runs),
    ``extra`` more columns after the swept values (column -> run id -> text: a search's trials
    and objective)."""
    extra = extra or {}
    table = Table(title=title or None, title_justify="left")
    table.add_column("run", no_wrap=True)
    stages = any(s.stage for s in statuses)
    if stages:
        table.add_column("stage", no_wrap=True)
    for key in swept_keys:
        table.add_column(short_key(key), justify="right")
    for name in extra:
        table.add_column(name, justify="right")
    table.add_column("state", no_wrap=True)
    if plan is not None:
        table.add_column("plan", no_wrap=True)
    progress = ("epoch",) if plan is not None else ("epoch", "loss", "ETA", "job")
    for name in progress:
        table.add_column(name, justify="right")
    reasons = any(s.reason for s in statuses)
    if reasons:
        table.add_column("reason")
    for s in statuses:
        style = STATE_STYLE.get(s.state, "")
        state = f"[{style}]{s.state}[/]" if style else s.state
        epoch = f"{s.epochs_done}/{s.epochs}" if s.epochs_done is not None else ""
        loss = f"{s.loss:.4f}" if s.loss is not None else ""
        cells = [s.run_id, *([s.stage or ""] if stages else [])]
        cells += [
            *(format_value(s.params.get(k)) for k in swept_keys),
            *(column.get(s.run_id, "") for column in extra.values()),
            state,
        ]
        if plan is not None:
            cells += [plan.get(s.run_id, ""), epoch]
        else:
            cells += [epoch, loss, _fmt_eta(s.eta_s), s.job_text]
        table.add_row(*cells, *([s.reason or ""] if reasons else []))
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
