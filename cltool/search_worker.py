"""A search's worker: ask the study for a trial, train it as an ordinary run, tell the study.

Workers share nothing but the sweep folder, so any number of them (``--jobs`` subprocesses here,
the tasks of a SLURM array on several nodes) work one study without a batch barrier: each takes
the next trial as soon as its last one ends, until the study holds ``trials`` finished ones.

Who works on what, kept in the sweep folder's ``study/``:

- ``journal.log``: Optuna's journal (trials, parameters, intermediate and final values).
- ``lock.json``: held (:class:`~cltool.lock.RunLock`) while a worker picks its next trial and
  lists its run in the manifest, so that two workers never take the same trial or lose a
  manifest entry.
- ``workers/<worker>/lock.json``: each worker's own lock, with a heartbeat. A trial records the
  worker and lock token that took it; a running trial whose worker lock is gone, dead, stale or
  now someone else's (a requeued SLURM task starts again under the same name) is taken over by
  the next worker that looks, and its run resumes from its checkpoint. So a killed sweep or a
  preempted task loses no trial and repeats none.

Intermediate values are the kNN monitor's (epoch records, step = epochs trained); a trial that
resumes or reuses a run first replays the values its run folder already holds, so the pruner
judges it on its whole history. Torch is imported by :func:`cltool.run.run_recipe` only.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cltool.lock import RunHeld, RunLock, read_holder, slurm_job
from cltool.recipe import Recipe, to_toml
from cltool.runstate import PRUNED, run_state
from cltool.search import MONITOR, STUDY, SearchSpec, open_study
from cltool.search_space import describe_params
from cltool.sweep import MANIFEST, RECIPES, load_manifest
from cltool.track import DONE, FAILED, LOCK, RunDir, atomic_write_json, atomic_write_text

#: Seconds between two tries for the study's lock, and between two looks at a run another
#: trial of the same recipe trains.
POLL_S = 0.5
WORKERS = "workers"
CLAIM = "claim"


def worker_name() -> str:
    """A SLURM task's job id (a requeued start keeps it), else host and pid."""
    job, _ = slurm_job()
    return f"slurm-{job}" if job else f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    """A trial this worker took, its values, the steps it already reported and its run."""

    trial: optuna.trial.Trial
    params: dict[str, Any]
    reported: frozenset[int]
    recipe: Recipe
    run_dir: RunDir

    @property
    def number(self) -> int:
        return self.trial.number

    def describe(self) -> str:
        return f"trial {self.number}: run {self.recipe.fingerprint} {describe_params(self.params)}"


def _held(folder: Path) -> RunLock:
    """The study's lock, waiting while another worker holds it (a dead one's is taken over)."""
    while True:
        try:
            return RunLock(folder).acquire()
        except RunHeld:
            time.sleep(POLL_S)


def _abandoned(trial: optuna.trial.FrozenTrial, workers: Path) -> bool:
    """Whether a running trial's worker no longer works on it."""
    claim = trial.user_attrs.get(CLAIM) or {}
    holder = read_holder(workers / str(claim.get("worker")) / LOCK)
    return holder is None or holder.token != claim.get("token") or holder.gone() is not None


def next_trial(study: optuna.Study, spec: SearchSpec, name: str, token: str) -> Claim | None:
    """Under the study's lock: an abandoned trial to resume, else a new one while the budget
    allows; None when every trial is finished or taken. The run joins the manifest here."""
    lock = _held(spec.folder / STUDY)
    try:
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        abandoned = [t for t in running if _abandoned(t, spec.folder / STUDY / WORKERS)]
        if abandoned:
            # Optuna continues a trial only in the process that asked for it; Study.ask itself
            # wraps the stored trial's id in a Trial, as done here.
            trial = optuna.trial.Trial(study, abandoned[0]._trial_id)
            reported = frozenset(abandoned[0].intermediate_values)
        elif sum(t.state.is_finished() for t in trials) + len(running) < spec.settings.trials:
            trial, reported = study.ask(spec.distributions()), frozenset()
        else:
            return None
        trial.set_user_attr(CLAIM, {"worker": name, "token": token})
        recipe = spec.recipe(trial.params)
        trial.set_user_attr("run_id", recipe.fingerprint)
        _list_run(spec, recipe, trial.params, trial.number, name)
        run_dir = RunDir.for_run(spec.out, recipe.name, recipe.fingerprint)
        return Claim(trial, dict(trial.params), reported, recipe, run_dir)
    finally:
        lock.release()


def _list_run(
    spec: SearchSpec, recipe: Recipe, params: dict[str, Any], number: int, name: str
) -> None:
    """Add the trial's run to the manifest (once per run; trials that share a recipe share its
    entry) with this worker as its latest submission."""
    recipe_file = spec.folder / RECIPES / f"{recipe.fingerprint}.toml"
    if not recipe_file.exists():
        atomic_write_text(recipe_file, to_toml(recipe))
    manifest = load_manifest(spec.folder)
    entry = next((r for r in manifest["runs"] if r["run_id"] == recipe.fingerprint), None)
    if entry is None:
        entry = {
            "run_id": recipe.fingerprint,
            "run_dir": f"{recipe.name}/{recipe.fingerprint}",
            "recipe": f"{RECIPES}/{recipe.fingerprint}.toml",
            "params": params,
            "trials": [],
            "submissions": [],
        }
        manifest["runs"].append(entry)
    entry["trials"] = sorted({*entry.get("trials", []), number})
    job, _ = slurm_job()
    entry["submissions"].append(
        {
            "executor": "search",
            "job_id": job or str(os.getpid()),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "worker": name,
            "array_index": None,
            "submitted_at": time.time(),
            "attempt": len(entry["submissions"]) + 1,
        }
    )
    atomic_write_json(spec.folder / MANIFEST, manifest)


def recorded_values(run_dir: RunDir, objective: str) -> dict[int, float]:
    """The monitor's values a run folder holds, by epochs trained (its checkpoint's records)."""
    return {
        int(r["epoch"]) + 1: float(r[objective])
        for r in run_dir.records()
        if r.get("kind") == "epoch" and isinstance(r.get(objective), int | float)
    }


def run_trial(
    study: optuna.Study, spec: SearchSpec, claim: Claim, should_stop: Callable[[], bool]
) -> str:
    """Train (or reuse, or resume) the claimed trial's run and tell the study how it ended;
    returns the run's state. Raises ``Interrupted`` when stopped: the trial stays running, for
    the next worker to resume from the run's checkpoint.

    A run already done gives its result; a run already pruned (by an earlier trial of the same
    recipe, or this one before a kill) prunes the trial, as does the pruner judging the values
    the run folder holds before training goes on."""
    from cltool.run import Interrupted, run_recipe

    settings, trial, epochs = spec.settings, claim.trial, claim.recipe.train.epochs
    reported = set(claim.reported)

    def judge(step: int, value: float) -> bool:
        if step not in reported:
            trial.report(value, step)
            reported.add(step)
        return trial.should_prune()

    def reason(step: int, value: float) -> str:
        return f"pruned by the search at epoch {step}/{epochs} ({MONITOR} {value:.4f})"

    def prune(record: dict[str, Any]) -> str | None:
        value = record.get(settings.objective)
        step = int(record["epoch"]) + 1
        if not isinstance(value, int | float) or not judge(step, float(value)):
            return None
        return reason(step, value)

    monitored = settings.objective == MONITOR
    replayed = recorded_values(claim.run_dir, settings.objective) if monitored else {}
    verdicts = [judge(step, value) for step, value in sorted(replayed.items())]
    state = run_state(claim.run_dir).name
    if state != DONE and (state == PRUNED or (verdicts and verdicts[-1])):
        if state != PRUNED:
            step = max(replayed)
            claim.run_dir.write_state(PRUNED, reason=reason(step, replayed[step]))
        study.tell(trial, state=TrialState.PRUNED)
        return PRUNED
    while True:
        try:
            outcome = run_recipe(
                claim.recipe,
                spec.out,
                quiet=True,
                sweep_id=spec.folder.name,
                swept=claim.params,
                should_stop=should_stop,
                prune=prune if monitored and settings.pruner != "none" else None,
            )
            break
        except RunHeld:  # another trial of the same recipe trains it: wait for its result
            time.sleep(POLL_S * 4)
        except Interrupted:
            raise
        except Exception:  # the run folder says why (state.json, train.log)
            study.tell(trial, state=TrialState.FAIL)
            return FAILED
    if outcome.status == PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
        return PRUNED
    value = (outcome.summary or {}).get(settings.objective)
    if not isinstance(value, int | float):
        study.tell(trial, state=TrialState.FAIL)
        return FAILED
    study.tell(trial, float(value))
    return DONE


def work(
    folder: Path,
    should_stop: Callable[[], bool] = lambda: False,
    echo: Callable[[str], None] = lambda line: None,
) -> dict[int, str]:
    """Work the search in ``folder`` until no trial is left to take; returns trial number ->
    how its run ended, for the trials this worker ran."""
    spec = SearchSpec.load(folder)
    study = open_study(spec)
    name = worker_name()
    results: dict[int, str] = {}
    with RunLock(spec.folder / STUDY / WORKERS / name) as me:
        assert me.holder is not None
        while not should_stop():
            claim = next_trial(study, spec, name, me.holder.token)
            if claim is None:
                break
            echo(claim.describe())
            results[claim.number] = run_trial(study, spec, claim, should_stop)
            echo(f"trial {claim.number}: {results[claim.number]}")
    return results
