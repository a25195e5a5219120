"""``cl sweep --executor slurm`` against a real SLURM controller: arrays, preemption, failures.

Needs the one-node cluster of ``slurm/cluster.sh``. Run as root with no ``SLURM_CONF`` set, this
module brings it up itself (installing slurm-wlm and munge with apt-get when missing), so the
README's one test command covers it; elsewhere::

    eval "$(bash slurm/cluster.sh up)"     # exports SLURM_CONF
    pytest -m slurm tests/test_slurm.py

Skipped when ``sinfo`` cannot reach a controller, except under CI (``CI`` set), where a missing
cluster is a failure: CI must prove the SLURM path. Every wait has a deadline and jobs left behind
are cancelled, so a broken cluster fails these tests instead of hanging them; nothing here calls
submitit's ``job.result()``, which can wait forever on a cluster without accounting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import MOCO, invoke, sets
from helpers import TINY as BASE_TINY

from cltool.recipe import load_recipe
from cltool.run import run_recipe
from cltool.status import settled, sweep_status
from cltool.sweep import load_manifest
from cltool.track import DONE, RunDir


def _bring_up_local_cluster() -> None:
    """Start slurm/cluster.sh's cluster when we may (root) and no cluster was named."""
    if "SLURM_CONF" in os.environ or os.geteuid() != 0:
        return
    script = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"
    result = subprocess.run(
        ["bash", str(script), "up"], capture_output=True, text=True, timeout=600
    )
    for line in result.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            os.environ["SLURM_CONF"] = line.partition("=")[2].strip().strip("'\"")


def _controller_problem() -> str | None:
    _bring_up_local_cluster()
    if shutil.which("sinfo") is None:
        return 'no sinfo: install slurm-client and run `eval "$(bash slurm/cluster.sh up)"`'
    try:
        result = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is the controller up? `bash slurm/cluster.sh up`"
    if result.returncode != 0:
        return (
            f"sinfo cannot reach a controller ({result.stderr.strip()}); `bash slurm/cluster.sh up`"
        )
    return None


PROBLEM = _controller_problem()
if PROBLEM and os.environ.get("CI"):
    raise RuntimeError(f"CI needs the local SLURM cluster: {PROBLEM}")

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(PROBLEM), reason=str(PROBLEM))]

#: Short runs; log every step so the heartbeat shows where a run is.
TINY = [*BASE_TINY, "train.log_every_steps=1"]
#: Long enough (about 10 s on two cores) to be caught mid-run, with checkpoints every 5 steps.
PREEMPTIBLE = [
    *TINY,
    "train.epochs=3",
    "data.num_train=1024",
    "train.checkpoint_every_steps=5",
]
SLURM = ["--executor", "slurm", "--cpus-per-task", "1", "--time", "1:00:00"]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def sweep_folders() -> Iterator[list[Path]]:
    """Sweep folders a test submitted; their jobs are cancelled whatever the outcome."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        for entry in load_manifest(folder)["runs"]:
            for submission in entry["submissions"] + entry.get("stage_submissions", []):
                subprocess.run(["scancel", submission["array_job_id"]], timeout=20, check=False)


def submit(out: Path, folders: list[Path], *args: object) -> Path:
    started = time.monotonic()
    result = invoke("sweep", MOCO, *args, *SLURM, "--out", out)
    assert result.exit_code == 0, result.output
    (folder,) = (out / "sweeps").iterdir()
    folders.append(folder)
    print(f"submitted in {time.monotonic() - started:.1f} s")
    return folder


def test_three_runs_one_array_all_finish(tmp_path: Path, sweep_folders: list[Path]) -> None:
    started = time.monotonic()
    folder = submit(tmp_path, sweep_folders, "--param", "m=0.9,0.99,0.999", *sets(TINY))
    runs = load_manifest(folder)["runs"]
    submissions = [entry["submissions"] for entry in runs]
    assert all(len(s) == 1 for s in submissions)
    assert len({s[0]["array_job_id"] for s in submissions}) == 1  # one job array
    assert sorted(s[0]["array_index"] for s in submissions) == [0, 1, 2]

    wait_for(lambda: settled(sweep_status(folder)), 240, "the array to finish")
    for entry in runs:
        run_dir = RunDir(tmp_path / entry["run_dir"])
        assert run_dir.is_done(), run_dir.state()
        assert run_dir.summary()["run_id"] == entry["run_id"]
    status = invoke("status", folder)
    assert status.exit_code == 0, status.output
    again = invoke(
        "sweep", MOCO, "--param", "m=0.9,0.99,0.999", *sets(TINY), *SLURM, "--out", tmp_path
    )
    assert again.exit_code == 0 and "all 3 runs done" in again.output
    print(f"3-run array: {time.monotonic() - started:.1f} s")


def test_preempted_task_is_requeued_and_resumes_to_the_same_metrics(
    tmp_path: Path, sweep_folders: list[Path]
) -> None:
    started = time.monotonic()
    folder = submit(tmp_path / "slurm", sweep_folders, "--param", "m=0.95", *sets(PREEMPTIBLE))
    (entry,) = load_manifest(folder)["runs"]
    run_dir = RunDir(tmp_path / "slurm" / entry["run_dir"])
    job_id = entry["submissions"][0]["job_id"]

    def mid_run() -> bool:
        state = run_dir.state() or {}
        return state.get("status") == "running" and state.get("global_step", 0) >= 6

    wait_for(mid_run, 120, "the task to pass step 6")
    preempted_at = run_dir.state()["global_step"]
    # What SLURM sends before a preemption or the time limit; submitit checkpoints and requeues.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=20)
    wait_for(lambda: settled(sweep_status(folder)), 240, "the requeued task to finish")

    summary = run_dir.summary()
    assert run_dir.is_done() and summary is not None
    assert summary["resumed_from_step"] is not None
    assert preempted_at <= summary["resumed_from_step"] < summary["global_step"]
    assert summary["run_id"] == entry["run_id"]  # same run id, same folder
    assert len(load_manifest(folder)["runs"][0]["submissions"]) == 1  # requeued, not resubmitted
    print(f"preempt + requeue + resume: {time.monotonic() - started:.1f} s")

    reference = run_recipe(
        load_recipe(MOCO, [*PREEMPTIBLE, "m=0.95"]), tmp_path / "ref", quiet=True
    )
    assert reference.status == DONE
    assert reference.summary["resumed_from_step"] is None
    for key in ("knn_top1", "global_step", "epochs_done"):
        assert summary[key] == reference.summary[key], key
    # The heartbeat's last loss is the last epoch's mean loss: resumed and uninterrupted agree.
    assert run_dir.state()["loss"] == pytest.approx(reference.run_dir.state()["loss"], rel=1e-6)


def test_status_reports_a_run_that_crashed_inside_its_job(
    tmp_path: Path, sweep_folders: list[Path]
) -> None:
    started = time.monotonic()
    missing = tmp_path / "no-such-images"
    folder = submit(
        tmp_path, sweep_folders, "--param", "data.dataset=glyphs,imagefolder",
        "--set", f"data.root={missing}", "--set", "data.download=false", *sets(TINY),
    )  # fmt: skip
    wait_for(lambda: settled(sweep_status(folder)), 240, "both tasks to end")
    status = invoke("status", folder, "--format", "json")
    assert status.exit_code == 3, status.output
    report = json.loads(status.output)
    assert report["counts"] == {"done": 1, "failed": 1}
    failed = next(r for r in report["runs"] if r["state"] == "failed")
    assert failed["params"] == {"data.dataset": "imagefolder"}
    assert str(missing) in failed["reason"]
    table = invoke("status", folder)
    assert table.exit_code == 3 and "failed" in table.output
    print(f"failed-run sweep: {time.monotonic() - started:.1f} s")


def test_stages_wait_for_their_own_run_through_job_dependencies(
    tmp_path: Path, sweep_folders: list[Path]
) -> None:
    """A 2-run sweep with a fine-tuning stage: each run's stages are one job submitted with
    ``afterok:<its run's array task>``, and start once that run is done."""
    started = time.monotonic()
    stages = ['stages.run=["finetune"]', "stages.fractions=[0.1]", "finetune.epochs=2"]
    folder = submit(tmp_path, sweep_folders, "--param", "m=0.9,0.99", *sets([*TINY, *stages]))
    entries = load_manifest(folder)["runs"]
    for entry in entries:
        (parent,) = entry["submissions"]
        (stage_job,) = entry["stage_submissions"]
        assert stage_job["depends_on"] == parent["job_id"]
        script = folder / "slurm" / f"{stage_job['job_id']}_submission.sh"
        assert f"#SBATCH --dependency=afterok:{parent['job_id']}" in script.read_text()
    wait_for(lambda: settled(sweep_status(folder)), 300, "runs and stages to finish")
    rows = sweep_status(folder)
    assert [r.state for r in rows] == [DONE] * 4, [(r.run_id, r.state, r.reason) for r in rows]
    assert [r.stage for r in rows] == [None, "finetune 10%", None, "finetune 10%"]
    for entry in entries:
        run_dir = RunDir(tmp_path / entry["run_dir"])
        (stage,) = entry["stages"]
        stage_dir = RunDir(tmp_path / stage["run_dir"])
        assert stage_dir.summary()["parent"] == entry["run_id"]
        # the stage started after its run had finished
        assert stage_dir.state()["started_at"] >= run_dir.state()["updated_at"]
    assert invoke("status", folder).exit_code == 0
    print(f"2 runs + 2 stage jobs: {time.monotonic() - started:.1f} s")


def test_two_overlapping_sweeps_train_their_shared_run_once(
    tmp_path: Path, sweep_folders: list[Path]
) -> None:
    """Two sweeps submitted back to back share the run m=0.99: one task trains it, the other
    finds it held (or done) and leaves it alone; both sweeps see it done."""
    started = time.monotonic()
    folders = []
    for values in ("0.9,0.99", "0.99,0.999"):
        before = set((tmp_path / "sweeps").glob("*"))
        result = invoke(
            "sweep", MOCO, "--param", f"m={values}", *sets(PREEMPTIBLE), *SLURM, "--out", tmp_path
        )
        assert result.exit_code == 0, result.output
        (folder,) = set((tmp_path / "sweeps").glob("*")) - before
        folders.append(folder)
        sweep_folders.append(folder)
    for folder in folders:
        wait_for(lambda f=folder: settled(sweep_status(f)), 300, f"sweep {folder.name} to end")
    shared = load_recipe(MOCO, [*PREEMPTIBLE, "m=0.99"]).fingerprint
    for folder in folders:
        states = {s.run_id: s.state for s in sweep_status(folder)}
        assert set(states.values()) == {DONE} and shared in states, states
    run_dir = RunDir.for_run(tmp_path, "moco", shared)
    assert run_dir.log.read_text().count(f"run {shared}: ") == 1, "trained more than once"
    assert len({r["global_step"] for r in run_dir.records() if r["kind"] == "step"}) == len(
        [r for r in run_dir.records() if r["kind"] == "step"]
    )
    print(f"two overlapping sweeps: {time.monotonic() - started:.1f} s")


def test_one_run_on_two_tasks_of_the_node_trains_to_the_end(tmp_path: Path) -> None:
    """``cl run --executor slurm``: one job, two tasks (ranks), gloo on the node's CPUs."""
    recipe = load_recipe(MOCO, TINY)
    result = invoke(
        "run", MOCO, "--executor", "slurm", "--nproc", 2, "--out", tmp_path, *sets(TINY)
    )
    assert result.exit_code == 0, result.output
    job_id = result.output.split("submitted job ")[1].split(":")[0]
    run_dir = RunDir.for_run(tmp_path, "moco", recipe.fingerprint)
    try:
        wait_for(run_dir.is_done, 240, "the two-task run to finish")
    finally:
        subprocess.run(["scancel", job_id], timeout=20, check=False)
    summary = run_dir.summary()
    assert summary["world_size"] == 2 and summary["epochs_done"] == 1


def test_a_two_worker_array_completes_a_small_study(tmp_path: Path) -> None:
    """``cl sweep --search --executor slurm --workers 2``: one array of two workers shares the
    study in the sweep folder, each asking for the next trial until all are finished."""
    from cltool.search import read_trials

    started = time.monotonic()
    short = [*(s for s in TINY if not s.startswith(("train.epochs", "eval.every"))),
             "train.epochs=2", "eval.every_epochs=1", "data.num_train=128"]  # fmt: skip
    result = invoke(
        "sweep", MOCO, "--search", "random", "--trials", 4, "--param", "lr=1e-3..1e-1:log",
        "--param", "T=0.05..0.5", *sets(short), *SLURM, "--workers", 2, "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    array = result.output.split("submitted job array ")[1].split()[0]
    (folder,) = (tmp_path / "sweeps").iterdir()
    try:
        finished = lambda: sum(t.state.is_finished() for t in read_trials(folder)) == 4  # noqa: E731
        wait_for(finished, 300, "the two workers to finish 4 trials")
    finally:
        subprocess.run(["scancel", array], timeout=20, check=False)
    trials = read_trials(folder)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    workers = {t.user_attrs["claim"]["worker"] for t in trials}
    assert workers <= {f"slurm-{array}_0", f"slurm-{array}_1"}, workers
    for entry in load_manifest(folder)["runs"]:
        assert RunDir(tmp_path / entry["run_dir"]).state()["status"] in ("done", "pruned")
    status = invoke("status", folder)
    assert status.exit_code == 0, status.output
    print(f"2-worker search array: {time.monotonic() - started:.1f} s ({len(workers)} workers)")


#: A trial long enough (16 steps, a checkpoint every 4) to be preempted mid-run.
SEARCH_PREEMPTIBLE = [
    *TINY,
    "train.epochs=2",
    "data.num_train=512",
    "train.checkpoint_every_steps=4",
]


def test_a_preempted_search_worker_is_requeued_and_resumes_its_trial(tmp_path: Path) -> None:
    """USR2 (SLURM's warning before preemption) to a search worker: its trial's run stops at a
    step with a checkpoint, the task is requeued, and the requeued worker takes the same trial
    back and resumes the run from the checkpoint: one trial, one run, trained once."""
    from cltool.search import read_trials

    started = time.monotonic()
    result = invoke(
        "sweep", MOCO, "--search", "random", "--trials", 1, "--param", "T=0.05..0.5",
        "--pruner", "none", *sets(SEARCH_PREEMPTIBLE), *SLURM, "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    array = result.output.split("submitted job ")[1].split()[0]
    (folder,) = (tmp_path / "sweeps").iterdir()
    try:
        wait_for(lambda: load_manifest(folder)["runs"], 120, "the worker to take a trial")
        run_dir = RunDir(tmp_path / load_manifest(folder)["runs"][0]["run_dir"])

        def mid_run() -> bool:
            state = run_dir.state() or {}
            return state.get("status") == "running" and state.get("global_step", 0) >= 6

        wait_for(mid_run, 120, "the trial's run to pass step 6")
        preempted_at = run_dir.state()["global_step"]
        subprocess.run(["scancel", "--signal=USR2", array], check=True, timeout=20)
        finished = lambda: all(t.state.is_finished() for t in read_trials(folder))  # noqa: E731
        wait_for(finished, 240, "the requeued worker to finish the trial")
    finally:
        subprocess.run(["scancel", array], timeout=20, check=False)
    (trial,) = read_trials(folder)
    summary = run_dir.summary()
    assert trial.state.name == "COMPLETE" and trial.value == summary["knn_top1"]
    assert preempted_at <= summary["resumed_from_step"] < summary["global_step"]
    assert len(load_manifest(folder)["runs"]) == 1
    print(f"preempted search worker: {time.monotonic() - started:.1f} s")


def test_cl_run_on_slurm_submits_its_stages_after_its_job(tmp_path: Path) -> None:
    """``cl run --executor slurm`` of a recipe with stages: the run's job, then a stages job
    held by ``afterok`` on it; both end done."""
    from cltool.stages import stage_dirs

    stages = ['stages.run=["finetune"]', "stages.fractions=[0.1]", "finetune.epochs=2"]
    result = invoke("run", MOCO, *SLURM, "--out", tmp_path, *sets([*TINY, *stages]))
    assert result.exit_code == 0, result.output
    job_id = result.output.split("submitted job ")[1].split(":")[0]
    stages_job = result.output.split("submitted job ")[2].split(":")[0]
    assert f"once job {job_id} succeeded" in result.output
    run_dir = RunDir.for_run(tmp_path, "moco", load_recipe(MOCO, [*TINY, *stages]).fingerprint)
    script = run_dir.path / "slurm" / f"{stages_job}_submission.sh"
    assert f"#SBATCH --dependency=afterok:{job_id}" in script.read_text()
    try:
        wait_for(lambda: any(d.is_done() for d in stage_dirs(run_dir)), 240, "the stage")
    finally:
        subprocess.run(["scancel", job_id, stages_job], timeout=20, check=False)
    (stage,) = stage_dirs(run_dir)
    assert stage.state()["started_at"] >= run_dir.state()["updated_at"]
