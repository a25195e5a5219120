"""``cl sweep --search``: the space, bad input, and real Optuna studies of real (tiny) runs.

The end-to-end tests train on the embedded glyphs with runs of two short epochs and the kNN
monitor after the first, so the pruner has one value per trial to judge.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from pathlib import Path

import pytest
from helpers import MOCO, TINY, invoke, sets, start_cl
from typer.testing import CliRunner

from cltool.lock import RunLock
from cltool.runstate import PRUNED, run_state
from cltool.search import (
    STUDY,
    SearchSpec,
    compile_search,
    open_study,
    read_trials,
    write_search,
)
from cltool.search_space import parse_search_param
from cltool.search_worker import WORKERS, next_trial, worker_name
from cltool.sweep import load_manifest
from cltool.track import DONE, RunDir

#: Two epochs, the kNN monitor after the first: one intermediate value per trial.
SHORT = [
    *(s for s in TINY if not s.startswith(("train.epochs", "eval.every_epochs"))),
    "train.epochs=2",
    "eval.every_epochs=1",
    "data.num_train=128",
]
SPACE = ["--param", "lr=1e-3..1e-1:log", "--param", "T=0.05..0.5"]


def search_args(out: Path, trials: int, *extra: object) -> list[str]:
    args = ["sweep", MOCO, "--search", "random", "--trials", trials, *SPACE, *sets(SHORT)]
    return [str(a) for a in [*args, "--out", out, *extra]]


# -- the space and bad input -------------------------------------------------------------------


def test_params_become_ranges_log_ranges_integer_ranges_and_choices() -> None:
    lr = parse_search_param("lr=1e-3..1e-1:log")
    assert (lr.key, lr.kind, lr.low, lr.high, lr.log) == ("optim.lr", "float", 1e-3, 1e-1, True)
    big_k = parse_search_param("K=256..4096")
    assert (big_k.kind, big_k.low, big_k.high, big_k.log) == ("int", 256, 4096, False)
    m = parse_search_param("m=0.9,0.99,0.9")
    assert (m.kind, m.choices) == ("categorical", (0.9, 0.99))
    grid_range = parse_search_param("T=0.1..0.3:lin:3")  # a grid's values are the choices
    assert grid_range.choices == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--param", "m=0.9..1"], "--param m=0.9..1"),  # m must stay below 1
        (["--param", "lr=0.1..0.001"], "needs A < B"),
        (["--param", "lr=0..0.1:log"], "a log range needs A > 0"),
        (["--param", "K=1.5..8"], "the ends must be whole numbers"),
        (["--param", "method=a..b"], "is not a number: give its choices"),
        (["--param", "T=0.1..0.5", "--zip", "T,K=0.1:1024,0.2:4096"], "search it or grid it"),
        (["--param", "T=0.1..0.5", "--seeds", "2"], "takes no grid dimension"),
        (["--param", "T=0.1..0.5", "--objective", "linear_top1"], "--objective linear_top1"),
        (["--param", "T=0.1..0.5", "--direction", "down"], "--direction down"),
        (["--param", "T=0.1..0.5", "--pruner", "median"], "--pruner median"),
        (["--param", "T=0.1..0.5", "--workers", "2"], "--workers 2"),
    ],
)
def test_bad_search_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    base = ["sweep", MOCO, "--search", "tpe", "--trials", "4", "--out", tmp_path / "runs"]
    result = invoke(*base, *args, *sets(["eval.linear=false"]))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--search", "tpe", "--trials", "0", "--param", "T=0.1..0.5"], "--trials 0"),
        (["--search", "tpe", "--param", "T=0.1..0.5"], "--trials 20"),
        (["--search", "grid", "--trials", "3", "--param", "T=0.1..0.5"], "--search grid"),
        (["--param", "T=0.1..0.5"], "needs --search"),  # a distribution in a grid sweep
        (["--param", "T=0.1,0.2", "--trials", "3"], "--trials: only a search takes it"),
    ],
)
def test_search_flags_and_distributions_need_each_other(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = invoke("sweep", MOCO, "--out", tmp_path / "runs", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_the_sweep_table_holds_a_search_and_flags_replace_its_keys(tmp_path: Path) -> None:
    recipe = tmp_path / "search.toml"
    recipe.write_text(
        MOCO.read_text()
        + '\n[sweep]\nsearch = "tpe"\ntrials = 5\nparam = { "optim.lr" = "1e-3..1e-1:log", '
        "m = [0.9, 0.99] }\n"
    )
    result = invoke("sweep", recipe, "--dry-run", "--param", "m=0.5..0.9", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "tpe, 5 trials" in result.output
    assert "0.001..0.1:log" in result.output and "0.5..0.9" in result.output
    assert "0.99" not in result.output  # the flag replaced the file's choices for m
    assert not (tmp_path / "sweeps").exists()


# -- the study, shared by workers ----------------------------------------------------------------


def _ask_and_tell(folder: str, count: int) -> None:
    """A worker that asks for trials and tells made-up values at once, as fast as it can."""
    spec = SearchSpec.load(Path(folder))
    study = open_study(spec)
    name = worker_name()
    with RunLock(spec.folder / STUDY / WORKERS / name) as me:
        for _ in range(count):
            claim = next_trial(study, spec, name, me.holder.token)
            assert claim is not None
            study.tell(claim.trial, claim.params["optim.lr"])


def test_two_workers_writing_the_journal_at_once_lose_no_trial(tmp_path: Path) -> None:
    search = compile_search(
        MOCO,
        flags={"search": "random", "trials": 40},
        params=["lr=1e-3..1e-1:log", "T=0.05..0.5"],
        overrides=[],
    )
    folder = write_search(search, tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_ask_and_tell, args=(str(folder), 20)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
        assert worker.exitcode == 0
    trials = read_trials(folder)
    assert sorted(t.number for t in trials) == list(range(40))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert all(t.value == t.params["optim.lr"] for t in trials)  # each told its own value
    runs = load_manifest(folder)["runs"]
    assert sorted(n for r in runs for n in r["trials"]) == list(range(40))
    claims = {t.user_attrs["claim"]["worker"] for t in trials}
    assert len(claims) == 2


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_six_trial_search_with_pruning_runs_to_the_end_with_two_workers(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    result = invoke(*search_args(tmp_path, 6, "--jobs", "2"))
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "sweeps").iterdir()
    trials = read_trials(folder)
    assert sorted(t.number for t in trials) == list(range(6))
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "PRUNED"} and "PRUNED" in states, states
    workers = {t.user_attrs["claim"]["worker"] for t in trials}
    assert len(workers) == 2  # both workers took trials
    manifest = load_manifest(folder)
    for trial in trials:
        entry = next(r for r in manifest["runs"] if r["run_id"] == trial.user_attrs["run_id"])
        run_dir = RunDir(tmp_path / entry["run_dir"])
        state = run_state(run_dir)
        if trial.state.name == "PRUNED":
            assert state.name == PRUNED and "epoch 1/2" in (state.reason or "")
            assert run_dir.summary() is None and trial.value == trial.intermediate_values[1]
        else:
            assert state.name == DONE
            assert run_dir.summary()["knn_top1"] == trial.value

    status = invoke("status", folder, "--format", "json")
    assert status.exit_code == 0, status.output  # pruned trials are finished, not failures
    report = json.loads(status.output)
    assert PRUNED in report["counts"] and set(report["counts"]) <= {DONE, PRUNED}
    assert len(report["trials"]) == 6
    table = invoke("status", folder)
    assert "pruned" in table.output and "trial" in table.output

    from cltool.cli import app

    shown = CliRunner().invoke(app, ["report", str(folder), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    reported = json.loads(shown.stdout)
    pruned_runs = sum(g["pruned"] for g in reported["groups"])
    assert pruned_runs == sum(t.state.name == "PRUNED" for t in trials)
    assert reported["search"]["counts"]["pruned"] == pruned_runs
    best = reported["search"]["best"][0]
    assert best == max((t for t in trials if t.value is not None and t.state.name == "COMPLETE"),
                       key=lambda t: t.value).number  # fmt: skip
    figure = tmp_path / "search.png"
    drawn = CliRunner().invoke(app, ["report", str(folder), "--plot", str(figure)])
    assert drawn.exit_code == 0 and (tmp_path / "search-search.png").stat().st_size > 0
    print(f"6-trial search, 2 workers: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_a_killed_search_rerun_finishes_the_same_study_without_repeating_trials(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    args = search_args(tmp_path, 3, "--pruner", "none")[1:]  # start_cl adds nothing before it
    process = start_cl("sweep", *args, cwd=tmp_path)
    deadline = time.monotonic() + 240
    folder = None
    while time.monotonic() < deadline:
        folders = list((tmp_path / "sweeps").glob("*"))
        finished = [t for t in read_trials(folders[0])] if folders else []
        if sum(t.state.name == "COMPLETE" for t in finished) >= 1:
            folder = folders[0]
            break
        time.sleep(0.2)
    assert folder is not None, process.communicate(timeout=5)
    process.send_signal(signal.SIGKILL)  # no chance to tidy up: a lost node, an OOM kill
    process.wait(timeout=30)
    before = {t.number: t for t in read_trials(folder)}
    done_before = {
        t.user_attrs["run_id"]: RunDir(tmp_path / "moco" / t.user_attrs["run_id"])
        for t in before.values()
        if t.state.name == "COMPLETE"
    }
    stamps = {run_id: d.summary_file.stat().st_mtime_ns for run_id, d in done_before.items()}

    again = invoke(*search_args(tmp_path, 3, "--pruner", "none"))
    assert again.exit_code == 0, again.output
    after = read_trials(folder)
    assert sorted(t.number for t in after) == [0, 1, 2]  # the same study, no extra trial
    assert all(t.state.name == "COMPLETE" for t in after)
    for run_id, run_dir in done_before.items():  # finished trials were not trained again
        assert run_dir.summary_file.stat().st_mtime_ns == stamps[run_id]
    for number, trial in before.items():  # values kept, an interrupted trial resumed as itself
        assert after[number].params == trial.params
    finished = invoke(*search_args(tmp_path, 3, "--pruner", "none"))  # starts nothing
    assert finished.exit_code == 0 and "3 of 3 trials: 3 complete" in finished.output
    assert "local worker" not in finished.output
    print(f"killed and rerun search: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_a_trial_whose_recipe_is_a_finished_run_reuses_its_result(tmp_path: Path) -> None:
    """Two choices, three trials: some trial repeats a recipe and takes its run's result."""
    args = ["sweep", MOCO, "--search", "random", "--trials", "3", "--param", "m=0.9,0.99"]
    result = invoke(*args, "--pruner", "none", *sets(TINY), "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "sweeps").iterdir()
    trials = read_trials(folder)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    runs = load_manifest(folder)["runs"]
    assert len(runs) < 3 and sorted(n for r in runs for n in r["trials"]) == [0, 1, 2]
    for entry in runs:
        run_dir = RunDir(tmp_path / entry["run_dir"])
        values = {t.value for t in trials if t.user_attrs["run_id"] == entry["run_id"]}
        assert values == {run_dir.summary()["knn_top1"]}
        assert run_dir.log.read_text().count(f"run {entry['run_id']}: ") == 1  # trained once


def test_a_slurm_search_dry_run_shows_the_space_and_the_workers_array(tmp_path: Path) -> None:
    args = ["sweep", MOCO, "--search", "tpe", "--trials", 8, *SPACE, "--param", "m=0.9,0.99"]
    result = invoke(*args, "--executor", "slurm", "--workers", 3, "--dry-run", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "tpe, 8 trials, maximize knn_top1, pruner hyperband" in result.output
    assert "0.001..0.1:log" in result.output and "0.9,0.99" in result.output
    assert "#SBATCH --array=0-2" in result.output and "array of 3 workers" in result.output
    assert not (tmp_path / "sweeps").exists()


def test_a_pruned_run_is_pruned_even_while_its_worker_job_runs_on(tmp_path: Path) -> None:
    """The worker that pruned a trial goes on to the next one in the same SLURM job: the queue
    says running, the run is pruned all the same, with its reason."""
    run_dir = RunDir(tmp_path / "moco" / "abc")
    run_dir.path.mkdir(parents=True)
    run_dir.write_state(PRUNED, reason="pruned by the search at epoch 2/10 (knn_top1 41.0000)")
    submission = {"executor": "slurm", "job_id": "7_1"}
    state = run_state(run_dir, submission, {"7_1": "RUNNING"})
    assert (state.name, state.reason) == (PRUNED, run_dir.state()["reason"])


def test_a_bad_search_key_in_the_sweep_table_names_the_file_and_key(tmp_path: Path) -> None:
    recipe = tmp_path / "search.toml"
    recipe.write_text(
        MOCO.read_text() + '\n[sweep]\nsearch = "tpe"\ntrials = 0\nparam = { T = "0.1..0.3" }\n'
    )
    result = invoke("sweep", recipe, "--out", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        == f"error: {recipe}: sweep.trials = 0: needs at least 1 trial, e.g. --trials 20"
    )
    assert not (tmp_path / "runs").exists()
