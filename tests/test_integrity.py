"""Run folders that cannot be corrupted or misread: one owner per run (real competing
processes, a lock left by another host), a true state however a run ends (SIGHUP, SIGTERM, a
closed pipe, an unexpected error), ``cl status`` and ``cl report`` agreeing on every state,
group-readable files under ``umask 002`` and clipped settings said out loud."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MOCO, TINY, hold, run_cl, sets, start_cl
from typer.testing import CliRunner

from cltool.cli import app
from cltool.recipe import load_recipe
from cltool.run import run_recipe
from cltool.runstate import LOST, NEW, RUNNING, SUBMITTED, run_state
from cltool.sweep import compile_sweep, record_submissions, write_sweep
from cltool.track import DONE, FAILED, INTERRUPTED, RunDir, atomic_write_json

#: Long enough (several seconds on two cores) for a second process or a signal to meet it.
LONG = [*TINY, "train.epochs=8", "data.num_train=512", "train.log_every_steps=1"]


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def steps(run_dir: RunDir) -> list[tuple[str, int]]:
    return [(r["kind"], r["global_step"]) for r in run_dir.records()]


def assert_same_run(run_dir: RunDir, reference: RunDir) -> None:
    """The folder ends as a run that nobody disturbed ends: same records, same metrics."""
    assert steps(run_dir) == steps(reference), "metrics.jsonl holds duplicated or missing records"
    losses = [r["loss"] for r in run_dir.records() if r["kind"] == "epoch"]
    expected = [r["loss"] for r in reference.records() if r["kind"] == "epoch"]
    assert losses == pytest.approx(expected, abs=1e-6)
    summary, ref = run_dir.summary(), reference.summary()
    assert summary is not None and ref is not None
    assert summary["knn_top1"] == pytest.approx(ref["knn_top1"], abs=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """The LONG run, trained once without any competitor or signal."""
    out = tmp_path_factory.mktemp("reference")
    return run_recipe(load_recipe(MOCO, LONG), out, quiet=True).run_dir


# -- one owner per run -----------------------------------------------------------------------


def test_two_processes_on_one_run_train_it_once(tmp_path: Path, reference: RunDir) -> None:
    args = ["run", str(MOCO), "--quiet", *sets(LONG), "--out", str(tmp_path)]
    first = start_cl(*args, cwd=tmp_path)
    run_dir = RunDir.for_run(tmp_path, "moco", reference.path.name)
    wait_for(run_dir.lock_file)  # held from before the data set is built
    second = run_cl(*args, cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert f"pid {first.pid} on {socket.gethostname()}" in line and "heartbeat" in line
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_same_run(run_dir, reference)
    assert not run_dir.lock_file.exists()


def test_a_lock_from_another_host_is_respected_while_fresh_and_taken_over_when_stale(
    tmp_path: Path,
) -> None:
    recipe = load_recipe(MOCO, TINY)
    run_dir = RunDir.for_run(tmp_path, "moco", recipe.fingerprint)
    run_dir.path.mkdir(parents=True)
    hold(run_dir, host="node-7", pid=4242, heartbeat_age=3)
    args = ["run", str(MOCO), *sets(TINY), "--out", str(tmp_path)]
    refused = run_cl(*args, cwd=tmp_path)
    assert refused.returncode == 2
    assert re.fullmatch(
        rf"error: run {recipe.fingerprint} is being trained by pid 4242 on node-7 \(heartbeat "
        r"\d+ s ago\); this process does not train it: wait for it, or see `cl status`",
        refused.stderr.strip(),
    )
    assert sorted(p.name for p in run_dir.path.iterdir()) == ["lock.json"]

    hold(run_dir, host="node-7", pid=4242, heartbeat_age=3600)
    taken = run_cl(*args, cwd=tmp_path)
    assert taken.returncode == 0, taken.stderr
    assert f"taking over run {recipe.fingerprint}: pid 4242 on node-7 has not heartbeaten" in (
        taken.stdout
    )
    assert run_dir.is_done() and not run_dir.lock_file.exists()


def test_a_killed_holder_is_lost_then_taken_over_and_resumed(
    tmp_path: Path, reference: RunDir
) -> None:
    args = ["run", str(MOCO), *sets(LONG), "--out", str(tmp_path)]
    process = start_cl(*args, "--quiet", cwd=tmp_path)
    run_dir = RunDir.for_run(tmp_path, "moco", reference.path.name)
    wait_for(run_dir.checkpoint)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    lost = run_state(run_dir)
    assert lost.name == LOST and f"pid {process.pid} on {socket.gethostname()} is gone" in (
        lost.reason
    )
    resumed = run_cl(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    taking_over = f"taking over run {run_dir.path.name}: pid {process.pid}"
    assert taking_over in resumed.stdout and taking_over in run_dir.log.read_text()
    assert "resuming from step" in resumed.stdout
    assert_same_run(run_dir, reference)


# -- a true state however a run ends ---------------------------------------------------------


def test_sighup_checkpoints_exits_129_and_the_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, reference: RunDir
) -> None:
    args = ["run", str(MOCO), *sets(LONG), "--out", str(tmp_path)]
    process = start_cl(*args, cwd=tmp_path)
    run_dir = RunDir.for_run(tmp_path, "moco", reference.path.name)
    wait_for(run_dir.metrics)
    process.send_signal(signal.SIGHUP)
    process.communicate(timeout=120)
    assert process.returncode == 129
    state = run_state(run_dir)
    assert state.name == INTERRUPTED and state.reason.startswith("stopped by SIGHUP at step")
    assert run_dir.checkpoint.exists() and "interrupted: stopped by SIGHUP" in (
        run_dir.log.read_text()
    )
    saved = run_dir.state()
    assert saved["checkpoint_step"] == saved["global_step"] > 0  # the state follows the checkpoint
    again = run_cl(*args, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_run(run_dir, reference)


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path) -> None:
    args = ["run", str(MOCO), "--quiet", *sets(LONG), "--out", str(tmp_path)]
    process = start_cl(*args, cwd=tmp_path)
    run_dir = RunDir.for_run(tmp_path, "moco", load_recipe(MOCO, LONG).fingerprint)
    wait_for(run_dir.metrics)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    assert "SIGTERM: stopping after this step" in stderr and "Ctrl-C again" not in stderr
    assert run_state(run_dir).name == INTERRUPTED and run_dir.checkpoint.exists()


def test_a_closed_stdout_does_not_stop_training(tmp_path: Path) -> None:
    command = (
        f"set -o pipefail; {sys.executable} -m cltool run {MOCO} "
        + " ".join(f"--set {s}" for s in TINY)
        + f" --out {tmp_path} | head -1"
    )
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and "Traceback" not in result.stderr
    run_dir = RunDir.for_run(tmp_path, "moco", load_recipe(MOCO, TINY).fingerprint)
    assert run_dir.is_done() and "evaluating" in run_dir.log.read_text()


def test_an_unexpected_error_leaves_failed_with_its_line_and_the_traceback(
    tmp_path: Path,
) -> None:
    calls = []

    def breaks_at_the_third_step() -> bool:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk quota exceeded\nsecond line")
        return False

    recipe = load_recipe(MOCO, TINY)
    with pytest.raises(RuntimeError):
        run_recipe(recipe, tmp_path, quiet=True, should_stop=breaks_at_the_third_step)
    run_dir = RunDir.for_run(tmp_path, "moco", recipe.fingerprint)
    state = run_state(run_dir)
    assert (state.name, state.reason) == (FAILED, "RuntimeError: disk quota exceeded")
    log = run_dir.log.read_text()
    assert "Traceback (most recent call last)" in log and "breaks_at_the_third_step" in log
    assert not run_dir.lock_file.exists()


def test_an_unwritable_out_is_one_line_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cl("run", str(MOCO), *sets(TINY), "--out", str(blocker), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert (
        line.startswith(f"error: {blocker}/moco/") and "give --out a folder you can write" in line
    )


def test_rerunning_a_finished_run_imports_no_torch(tmp_path: Path) -> None:
    run_recipe(load_recipe(MOCO, TINY), tmp_path, quiet=True)
    code = (
        "import sys\nfrom cltool.cli import app\n"
        f"app({['run', str(MOCO), *sets(TINY), '--out', str(tmp_path)]!r}, standalone_mode=False)"
        "\nprint('TORCH', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kNN top-1" in result.stdout and "TORCH False" in result.stdout


# -- one definition of a run's state ---------------------------------------------------------


def test_status_and_report_agree_on_every_state(tmp_path: Path) -> None:
    """One fixture folder per state; `cl status` and every format of `cl report` agree."""
    sweep = compile_sweep(MOCO, params=["m=0.1,0.2,0.3,0.4,0.5,0.6,0.7"])
    write_sweep(sweep, tmp_path)
    recipes = sweep.folder(tmp_path) / "recipes"
    done, running, lost, interrupted, failed, submitted, new = (
        r.run_dir(tmp_path) for r in sweep.runs
    )
    for run_dir in (done, running, lost, interrupted, failed):
        run_dir.path.mkdir(parents=True)
        run_dir.config.write_text((recipes / f"{run_dir.path.name}.toml").read_text())
    atomic_write_json(done.state_file, {"status": DONE})
    atomic_write_json(done.summary_file, {"knn_top1": 50.0, "linear_top1": 60.0})
    atomic_write_json(running.state_file, {"status": RUNNING})
    hold(running, socket.gethostname(), os.getpid())
    atomic_write_json(lost.state_file, {"status": RUNNING})
    hold(lost, socket.gethostname(), 2**22 + 7)  # no such process
    atomic_write_json(interrupted.state_file, {"status": INTERRUPTED, "reason": "stopped by X"})
    atomic_write_json(failed.state_file, {"status": FAILED, "reason": "ValueError: bad"})
    mine = {"executor": "local", "pid": os.getpid(), "host": socket.gethostname()}
    record_submissions(sweep.folder(tmp_path), {submitted.path.name: {**mine, "job_id": "1"}})
    expected = {
        done: DONE,
        running: RUNNING,
        lost: LOST,
        interrupted: INTERRUPTED,
        failed: FAILED,
        submitted: SUBMITTED,
        new: NEW,
    }
    runner = CliRunner()
    path = str(sweep.folder(tmp_path))

    def cl(*args: str) -> str:
        result = runner.invoke(app, [*args], env={"COLUMNS": "400", "NO_COLOR": "1"})
        assert result.exit_code in (0, 1, 3), result.output  # status: 3 when a run failed
        return result.stdout

    status = json.loads(cl("status", path, "--format", "json"))
    from_status = {r["run_id"]: (r["state"], r["reason"]) for r in status["runs"]}
    assert {run_id: state for run_id, (state, _) in from_status.items()} == {
        run_dir.path.name: state for run_dir, state in expected.items()
    }
    report = json.loads(cl("report", path, "--format", "json"))
    from_report = {
        run_id: (s["state"], s["reason"])
        for group in report["groups"]
        for run_id, s in group["run_states"].items()
    }
    assert from_report == from_status
    assert from_report[failed.path.name] == (FAILED, "ValueError: bad")

    m_of = {r.run_dir(tmp_path): f"{r.params['key_encoder.m']:g}" for r in sweep.runs}
    csv_rows = {
        row["key_encoder.m"]: row
        for row in csv.DictReader(io.StringIO(cl("report", path, "--format", "csv")))
    }
    text_rows = [
        *cl("report", path, "--format", "markdown").splitlines(),
        *cl("report", path).splitlines(),
    ]
    for run_dir, state in expected.items():
        m = m_of[run_dir]
        assert csv_rows[m][state] == "1"
        rows = [row for row in text_rows if f" {m} " in row]
        assert len(rows) == 2, rows  # one markdown row, one table row
        for row in rows:
            assert (f"1 {state}" in row) == (state != DONE), row


# -- files a group can read; settings the data clip ------------------------------------------


def test_under_umask_002_every_file_of_a_run_is_group_readable(tmp_path: Path) -> None:
    command = (
        f"umask 002 && {sys.executable} -m cltool run {MOCO} "
        + " ".join(f"--set {s}" for s in TINY)
        + f" --out {tmp_path} --quiet"
    )
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (run_path,) = (tmp_path / "moco").iterdir()
    files = [p for p in run_path.rglob("*")]
    assert {"config.toml", "state.json", "summary.json", "checkpoint.pt"} <= {p.name for p in files}
    for path in [run_path, *files]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o060 == 0o060 and mode & 0o002 == 0, (path.name, oct(mode))


def test_settings_the_data_clip_are_said_and_recorded(tmp_path: Path) -> None:
    """digits has 1,797 images (1,437 for training): ask for more of everything."""
    overrides = [
        *TINY,
        "data.dataset=digits",
        "data.image_size=8",
        "data.num_train=5000",
        "train.batch_size=4096",
        "dictionary.K=8192",
        "eval.knn_k=3000",
    ]
    result = run_cl("run", str(MOCO), *sets(overrides), "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    (run_path,) = (tmp_path / "moco").iterdir()
    effective = json.loads((run_path / "summary.json").read_text())["effective"]
    n = effective["num_train"]
    assert n < 5000 and effective["batch_size"] == n and effective["knn_k"] == n
    assert effective["K"] == 8192
    assert warnings == [
        f"warning: data.num_train = 5000, but digits has {n} such images: using {n}",
        f"warning: train.batch_size = 4096 is above the {n} training images: each step uses {n}",
        f"warning: dictionary.K = 8192 is above the {n} training images: the dictionary holds "
        "several keys of each image, a query's own among its negatives "
        "(dictionary.exclude_own_keys = true drops them)",
        f"warning: eval.knn_k = 3000 is above the {n} training images: using {n}",
    ]
