"""Sweeps: compiling grids into validated runs, the manifest, the plan, and the local executor."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from helpers import MOCO, TINY, hold, invoke, sets

from cltool.errors import RecipeError
from cltool.launch import WILL_SUBMIT, make_plan
from cltool.recipe import load_recipe
from cltool.runstate import LOST, NEW, PENDING, SUBMITTED, run_state
from cltool.slurm_options import SlurmOptions, parse_time
from cltool.sweep import (
    MANIFEST,
    compile_sweep,
    expand_range,
    load_manifest,
    parse_zip,
    record_submissions,
    write_sweep,
)
from cltool.track import DONE, FAILED, RUNNING, RunDir, atomic_write_json

# -- compiling ----------------------------------------------------------------------------------


def test_param_grid_is_the_cartesian_product_with_canonical_keys() -> None:
    sweep = compile_sweep(MOCO, params=["m=0.9,0.99", "K=1024,4096,16384"])
    assert sweep.swept_keys == ("key_encoder.m", "dictionary.K")
    assert len(sweep.runs) == 6
    assert [r.params for r in sweep.runs[:3]] == [
        {"key_encoder.m": 0.9, "dictionary.K": 1024},
        {"key_encoder.m": 0.9, "dictionary.K": 4096},
        {"key_encoder.m": 0.9, "dictionary.K": 16384},
    ]
    assert {(r.recipe.key_encoder.m, r.recipe.dictionary.K) for r in sweep.runs} == {
        (m, k) for m in (0.9, 0.99) for k in (1024, 4096, 16384)
    }


def test_zip_links_values() -> None:
    sweep = compile_sweep(MOCO, zips=["K,T=1024:0.1,4096:0.2"], params=["seed=0,1"])
    assert len(sweep.runs) == 4
    assert {(r.recipe.dictionary.K, r.recipe.loss.T) for r in sweep.runs} == {
        (1024, 0.1),
        (4096, 0.2),
    }
    with pytest.raises(RecipeError, match="2 values for 3 keys"):
        parse_zip("K,T,m=1:2")


def test_ranges() -> None:
    assert expand_range("1e-3..1e-1:log:3", "x") == [0.001, 0.01, 0.1]
    assert expand_range("1024..16384:x2", "x") == [1024, 2048, 4096, 8192, 16384]
    assert expand_range("0.1..0.3:lin:3", "x") == [0.1, 0.2, 0.3]
    assert expand_range("2..8:lin:4", "x") == [2, 4, 6, 8]
    assert expand_range("0.5", "x") is None
    with pytest.raises(RecipeError, match="log range needs positive"):
        expand_range("0..1:log:3", "x")
    with pytest.raises(RecipeError, match="factor > 1"):
        expand_range("1..8:x1", "x")
    sweep = compile_sweep(MOCO, params=["lr=0.5,1e-3..1e-1:log:3"])
    assert [r.recipe.optim.lr for r in sweep.runs] == [0.5, 0.001, 0.01, 0.1]


def test_seeds_count_up_from_the_base_seed() -> None:
    sweep = compile_sweep(MOCO, params=["m=0.9,0.99"], seeds=3, overrides=[("train.seed", 10)])
    assert sweep.swept_keys == ("key_encoder.m", "train.seed")
    assert sorted({r.recipe.train.seed for r in sweep.runs}) == [10, 11, 12]
    assert len(sweep.runs) == 6
    with pytest.raises(RecipeError, match="choose one"):
        compile_sweep(MOCO, params=["seed=1,2"], seeds=2)
    with pytest.raises(RecipeError, match="swept by two dimensions"):
        compile_sweep(MOCO, params=["m=0.9"], zips=["m,T=0.9:0.1"])


def test_run_ids_are_fingerprints_and_duplicates_are_one_run() -> None:
    sweep = compile_sweep(MOCO, params=["m=0.99,0.990,0.9"])
    assert len(sweep.runs) == 2
    for run in sweep.runs:
        same = load_recipe(MOCO, [f"key_encoder.m={run.params['key_encoder.m']}"])
        assert run.run_id == same.fingerprint
    # The sweep id follows the definition: stable, and different for another grid.
    again = compile_sweep(MOCO, params=["m=0.99,0.990,0.9"])
    assert again.sweep_id == sweep.sweep_id
    assert compile_sweep(MOCO, params=["m=0.9,0.999"]).sweep_id != sweep.sweep_id


def test_one_bad_value_rejects_the_sweep_with_the_cl_run_error(tmp_path: Path) -> None:
    """The same check as ``cl run --set``, blamed on the ``--param`` that gave the value."""
    with pytest.raises(RecipeError) as from_run:
        load_recipe(MOCO, ["m=1.5"])
    result = invoke("sweep", MOCO, "--param", "m=0.9,1.5", "--out", tmp_path / "out")
    assert result.exit_code == 2
    check = str(from_run.value).removeprefix("--set: ")
    assert f"error: --param m=0.9,1.5: {check}" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    result = invoke("sweep", MOCO, "--param", "momentun=0.9", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "unknown key" in result.output
    assert not (tmp_path / "out").exists()


def test_sweep_table_in_the_recipe_file_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(
        MOCO.read_text()
        + """
[sweep]
seeds = 2
param = { m = [0.9, 0.99], "optim.lr" = "0.01..0.1:log:2" }
zip = [ { K = [1024, 4096], T = [0.1, 0.2] } ]

[slurm]
partition = "gpu"
time = "2:00:00"
gpus_per_node = 1
sbatch = { exclude = "node3" }
"""
    )
    sweep = compile_sweep(path)
    assert sweep.swept_keys == (
        "key_encoder.m",
        "optim.lr",
        "dictionary.K",
        "loss.T",
        "train.seed",
    )
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    overridden = compile_sweep(path, params=["m=0.5"], seeds=1)
    assert {r.recipe.key_encoder.m for r in overridden.runs} == {0.5}
    assert len(overridden.runs) == 4
    options = SlurmOptions.from_table(sweep.slurm, str(path))
    merged = options.overridden_by(SlurmOptions(time="30", sbatch={"qos": "low"}))
    params = merged.submitit_parameters("x")
    assert params["partition"] == "gpu" and params["time"] == 30
    assert params["additional_parameters"] == {"exclude": "node3", "qos": "low"}
    path.write_text(MOCO.read_text() + "\n[sweep]\nparams = {m = [0.9]}\n")
    with pytest.raises(RecipeError, match="unknown \\[sweep\\] key 'params'"):
        compile_sweep(path)


def test_slurm_time_formats() -> None:
    assert parse_time("90") == 90
    assert parse_time("4:00:00") == 240
    assert parse_time("1-00") == 1440
    assert parse_time("10:30") == 11
    with pytest.raises(RecipeError):
        parse_time("four hours")


# -- manifest and plan ---------------------------------------------------------------------------


def test_manifest_records_runs_and_submissions(tmp_path: Path) -> None:
    sweep = compile_sweep(MOCO, params=["m=0.9,0.99"], seeds=2)
    write_sweep(sweep, tmp_path)
    folder = tmp_path / "sweeps" / sweep.sweep_id
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["sweep_id"] == sweep.sweep_id
    assert manifest["swept_keys"] == ["key_encoder.m", "train.seed"]
    assert manifest["definition"]["base_fingerprint"] == load_recipe(MOCO).fingerprint
    first = manifest["runs"][0]
    assert first["run_dir"] == f"moco/{first['run_id']}"
    assert first["params"] == {"key_encoder.m": 0.9, "train.seed": 0}
    assert load_recipe(folder / first["recipe"]).fingerprint == first["run_id"]
    job = {"executor": "slurm", "job_id": "7_0", "array_index": 0, "submitted_at": 1.0}
    record_submissions(folder, {first["run_id"]: job})
    record_submissions(folder, {first["run_id"]: {**job, "job_id": "9_0"}})
    write_sweep(sweep, tmp_path)  # a re-run keeps what was submitted
    submissions = load_manifest(folder)["runs"][0]["submissions"]
    assert [(s["job_id"], s["attempt"]) for s in submissions] == [("7_0", 1), ("9_0", 2)]


def _state(run_dir: RunDir, status: str, **fields) -> None:
    atomic_write_json(
        run_dir.state_file,
        {"status": status, "updated_at": time.time(), "started_at": time.time(), **fields},
    )


def test_plan_states_and_actions(tmp_path: Path) -> None:
    sweep = compile_sweep(MOCO, params=["m=0.5,0.6,0.7,0.8,0.9"])
    done, running, failed, lost, _ = (r.run_dir(tmp_path) for r in sweep.runs)
    _state(done, DONE)
    atomic_write_json(done.summary_file, {"knn_top1": 50.0})
    _state(running, RUNNING, epochs=4, global_step=5, total_steps=10)
    hold(running, host="elsewhere", pid=1)
    _state(failed, FAILED, reason="boom")
    _state(lost, RUNNING)
    hold(lost, host=socket.gethostname(), pid=2**22 + 12345)  # no such process
    plan = make_plan(sweep, tmp_path, retry_failed=False)
    states = {s.run_id: s.state for s in plan.statuses}
    assert [states[r.run_id] for r in sweep.runs] == [DONE, RUNNING, FAILED, LOST, NEW]
    actions = [plan.actions[r.run_id] for r in sweep.runs]
    assert actions == ["skip: done", "skip: running", "skip: failed", WILL_SUBMIT, WILL_SUBMIT]
    retry = make_plan(sweep, tmp_path, retry_failed=True)
    assert retry.actions[sweep.runs[2].run_id] == WILL_SUBMIT
    running_status = next(s for s in plan.statuses if s.run_id == sweep.runs[1].run_id)
    assert (running_status.epochs_done, running_status.epochs) == (2, 4)

    result = invoke(
        "sweep", MOCO, "--param", "m=0.5,0.6,0.7,0.8,0.9", "--out", tmp_path, "--dry-run"
    )
    assert result.exit_code == 0, result.output
    for word in ("done", "running", "failed", "lost", "new", "will submit", "nothing submitted"):
        assert word in result.output
    assert not (tmp_path / "sweeps").exists()


def test_scheduler_queue_decides_pending_and_lost(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    job = {"executor": "slurm", "job_id": "12_1"}
    now = time.time()
    assert run_state(run_dir, job, {"12_1": "PENDING"}, now).name == PENDING
    assert run_state(run_dir, job, {"12_1": "RUNNING"}, now).name == RUNNING
    assert run_state(run_dir, job, {}, now).name == LOST
    assert run_state(run_dir, job, None, now).name == SUBMITTED
    _state(run_dir, RUNNING)
    hold(run_dir, host="elsewhere", pid=1, slurm_job="12_1")
    left = run_state(run_dir, job, {}, now)  # the job left the queue without finishing
    assert left.name == LOST and "12_1 left the queue" in left.reason
    assert run_state(run_dir, job, None, now).name == RUNNING  # fresh heartbeat, no squeue
    stale = run_state(run_dir, job, None, now + 3600)
    assert stale.name == LOST and "heartbeat" in stale.reason


def test_dry_run_renders_the_slurm_array_script(tmp_path: Path) -> None:
    result = invoke(
        "sweep", MOCO, "--param", "m=0.9,0.99,0.999", "--executor", "slurm", "--dry-run",
        "--partition", "gpu", "--gpus-per-node", "1", "--time", "4:00:00", "--mem-gb", "8",
        "--array-parallelism", "2", "--sbatch", "exclude=node3", "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for line in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=240",
        "#SBATCH --mem=8192M",
        "#SBATCH --exclude=node3",
        "submitit.core._submit",
    ):
        assert line in result.output
    assert not (tmp_path / "sweeps").exists()
    bad = invoke("sweep", MOCO, "--param", "m=0.9", "--executor", "slurm", "--time", "soon")
    assert bad.exit_code == 2 and "slurm time 'soon'" in bad.output


def test_dry_run_maps_array_indices_to_runs_and_notes_cluster_defaults(tmp_path: Path) -> None:
    args = ["sweep", MOCO, "--param", "m=0.9,0.99,0.999", "--executor", "slurm", "--dry-run"]
    result = invoke(*args, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    runs = compile_sweep(MOCO, params=["m=0.9,0.99,0.999"]).runs
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines()]
    table = [row for row in cells if len(row) == 3 and row[0].isdigit()]
    expected = [
        [str(i), run.run_id, f"{run.params['key_encoder.m']:g}"] for i, run in enumerate(runs)
    ]
    assert table == expected
    note = next(line for line in result.output.splitlines() if line.startswith("note:"))
    assert "--cpus-per-task / --mem-gb" in note and "defaults" in note
    sized = invoke(*args, "--cpus-per-task", "4", "--mem-gb", "8", "--out", tmp_path)
    assert sized.exit_code == 0 and "note:" not in sized.output
    assert not (tmp_path / "sweeps").exists()


def test_counts_are_pluralised(tmp_path: Path) -> None:
    one = invoke("sweep", MOCO, "--param", "m=0.9", "--executor", "slurm", "--dry-run")
    assert one.exit_code == 0, one.output
    assert "1 run, 1 to submit" in one.output and "array of 1 task)" in one.output
    assert "1 runs" not in one.output and "1 tasks" not in one.output


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("m=a..b", "--param m=a..b: 'a..b' is neither a number nor a range: a range is A..B:lin:N"),
        ("m=0.9..0.99", "A..B:lin:N, A..B:log:N or A..B:xF, e.g. m=0.1..0.5:lin:5"),
        ("m=abc", '--param m=abc: key_encoder.m = "abc" must be a number'),
    ],
)
def test_a_bad_param_value_names_param_and_the_range_forms(
    tmp_path: Path, param: str, message: str
) -> None:
    result = invoke("sweep", MOCO, "--param", param, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "--set" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_bad_range_in_the_sweep_table_names_the_table(tmp_path: Path) -> None:
    recipe = tmp_path / "s.toml"
    recipe.write_text('[sweep]\nparam = { m = "0.9..0.99" }\n')
    with pytest.raises(RecipeError, match=r"s\.toml: sweep\.param\.m: '0\.9\.\.0\.99' is neither"):
        compile_sweep(recipe)


# -- the local executor, for real ----------------------------------------------------------------


@pytest.mark.slow
def test_local_sweep_end_to_end_then_rerun_does_nothing(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["sweep", MOCO, "--param", "m=0.9,0.99", *sets(TINY), "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    (folder,) = (out / "sweeps").iterdir()
    manifest = load_manifest(folder)
    assert len(manifest["runs"]) == 2
    for entry in manifest["runs"]:
        run_dir = RunDir(out / entry["run_dir"])
        assert run_dir.is_done()
        assert run_dir.summary()["knn_top1"] >= 0
        assert [s["attempt"] for s in entry["submissions"]] == [1]
    status = invoke("status", folder, "--format", "json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["counts"] == {"done": 2}

    next_steps = f"next: cl status {folder} (states), cl report {folder} (results)"
    assert next_steps in result.output

    again = invoke(*args)
    assert again.exit_code == 0 and "all 2 runs done" in again.output
    assert next_steps in again.output
    assert load_manifest(folder) == manifest


@pytest.mark.slow
def test_local_subprocesses_and_a_run_that_crashes(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    crash = tmp_path / "missing-images"
    args = [
        "sweep", MOCO, "--param", 'data.dataset=glyphs,imagefolder', "--set", f"data.root={crash}",
        "--set", "data.download=false", *sets(TINY), "--out", out, "--jobs", "2",
    ]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "1 of 2 runs did not finish" in " ".join(result.output.split())
    labels = sorted(re.findall(r"^\[(\d)/2\] ", result.output, re.MULTILINE))
    assert labels == ["1", "2"]  # --jobs keeps the [i/N] labels of the serial executor
    (folder,) = (out / "sweeps").iterdir()
    table = invoke("status", folder)
    pids = re.findall(r"local pid \d+", table.output)
    assert len(pids) == 2, table.output
    status = invoke("status", folder, "--format", "json")
    assert status.exit_code == 3
    report = json.loads(status.output)
    assert report["counts"] == {"done": 1, "failed": 1}
    failed = next(r for r in report["runs"] if r["state"] == "failed")
    assert failed["params"] == {"data.dataset": "imagefolder"}
    assert str(crash) in failed["reason"]
    # The report shows the failed configuration as a row, its swept key as a column, its reason.
    table = invoke("report", folder, "--format", "json")
    assert table.exit_code == 0, table.output
    rows = json.loads(table.stdout)
    assert rows["keys"] == ["data.dataset"]
    bad = next(g for g in rows["groups"] if g["values"] == {"data.dataset": "imagefolder"})
    (state,) = bad["run_states"].values()
    assert bad["failed"] == 1 and state == {"state": "failed", "reason": failed["reason"]}
    assert os.listdir(folder / "logs")
    rerun = invoke(*args)
    assert rerun.exit_code == 0 and "--retry-failed" in rerun.output
