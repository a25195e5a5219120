"""Stages after pretraining: fine-tuning, the linear probe, supervised-from-scratch and
distillation, as runs that start from another run (``cl run`` pipelines, ``cl eval``, sweeps,
``cl status``, ``cl report``).

Real training on the embedded glyphs throughout, sized to seconds: a tiny SimCLR v2 parent on
500 images (its smallest class has 40, so the smallest fraction is 0.0125) and stages of a few
epochs. The losses are checked against plain float64 loops over their formulas.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, invoke, run_cl, start_cl

from cltool.labels import class_counts, labelled_subset, minimum_fraction
from cltool.losses import classification_loss, distillation_loss
from cltool.recipe import load_recipe
from cltool.report import build_report, load_runs
from cltool.run import run_recipe
from cltool.stage_train import labelled_indices
from cltool.stages import plan_stages, stage_dirs
from cltool.status import sweep_status
from cltool.track import DONE, RunDir

SIMCLR_V2 = ROOT / "recipes" / "simclr_v2.toml"
#: A parent of a few seconds, and stages of a few seconds more.
PARENT = [*TINY, "data.num_train=500", "data.num_test=200", "stages.fractions=[0.05, 0.1]"]
STAGES = ["finetune.epochs=3", "distill.epochs=1", "distill.batch_size=128"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A finished tiny SimCLR v2 run (3-layer head, evaluated after its first layer)."""
    out = tmp_path_factory.mktemp("parent")
    outcome = run_recipe(load_recipe(SIMCLR_V2, PARENT), out, quiet=True)
    assert outcome.status == DONE
    return outcome.run_dir


def fresh_copy(parent: RunDir, tmp_path: Path) -> RunDir:
    """The parent run in a folder of its own, without stages (tests add theirs)."""
    copy = RunDir(tmp_path / "runs" / parent.path.parent.name / parent.path.name)
    shutil.copytree(parent.path, copy.path, ignore=shutil.ignore_patterns("stages"))
    return copy


# -- the losses against plain loops -----------------------------------------------------------


def test_classification_loss_matches_a_float64_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(7, 5, generator=g) * 3, torch.randint(0, 5, (7,), generator=g)
    expected = 0.0
    for i in range(7):
        row = [float(v) for v in logits[i].double()]
        expected += -(row[int(labels[i])] - math.log(sum(math.exp(v) for v in row)))
    expected /= 7
    got = classification_loss(logits.double(), labels)
    assert float(got) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 0.5, 4.0])
def test_distillation_loss_matches_a_float64_loop(T: float) -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 4, generator=g) * 2, torch.randn(6, 4, generator=g) * 2
    expected = 0.0
    for i in range(6):
        s = [float(v) / T for v in student[i].double()]
        t = [float(v) / T for v in teacher[i].double()]
        zs, zt = sum(math.exp(v) for v in s), sum(math.exp(v) for v in t)
        expected += -sum(math.exp(t[y]) / zt * math.log(math.exp(s[y]) / zs) for y in range(4))
    expected /= 6
    student = student.double().requires_grad_(True)
    teacher = teacher.double().requires_grad_(True)
    got = distillation_loss(student, teacher, T)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert teacher.grad is None  # the teacher is a target, not trained


# -- labelled subsets --------------------------------------------------------------------------


def test_labelled_subset_is_class_balanced_nested_and_its_own_seed() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 200, 10])
    small, large = labelled_subset(labels, 0.1, 0), labelled_subset(labels, 0.5, 0)
    assert np.bincount(labels[small]).tolist() == [10, 5, 20, 1]
    assert class_counts(labels, 0.5) == {0: 50, 1: 25, 2: 100, 3: 5}
    assert set(small) <= set(large)  # the 10% images are among the 50%
    assert np.array_equal(small, labelled_subset(labels, 0.1, 0))
    assert not np.array_equal(small, labelled_subset(labels, 0.1, 1))
    assert minimum_fraction(labels) == pytest.approx(0.05)
    assert class_counts(labels, 0.05)[3] == 1 and class_counts(labels, 0.049)[3] == 0


def test_labelled_subset_is_the_same_for_every_method_and_training_seed() -> None:
    data = ["data.num_train=500"]
    subsets = [
        labelled_indices(load_recipe(ROOT / "recipes" / f"{name}.toml", [*data, f"seed={s}"]), 0.1)
        for name in ("moco", "simclr_v2", "supcon")
        for s in (0, 1)
    ]
    assert all(torch.equal(subsets[0], other) for other in subsets[1:])
    assert abs(len(subsets[0]) - 50) <= 5  # 10% of 500, to an image per class
    other_seed = load_recipe(SIMCLR_V2, [*data, "stages.subset_seed=1"])
    assert not torch.equal(subsets[0], labelled_indices(other_seed, 0.1))


def test_stage_ids_hash_the_stage_settings_and_the_parent() -> None:
    recipe = load_recipe(SIMCLR_V2, ['stages.run=["finetune", "distill"]'])
    tuned = load_recipe(SIMCLR_V2, ['stages.run=["finetune", "distill"]', "finetune.lr=0.2"])
    reseeded = load_recipe(SIMCLR_V2, ['stages.run=["finetune", "distill"]', "seed=1"])
    assert recipe.fingerprint == tuned.fingerprint  # stage keys never retrain the run
    ids = [s.stage_id for s in plan_stages(recipe)]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {s.stage_id for s in plan_stages(tuned)}
    assert not set(ids) & {s.stage_id for s in plan_stages(reseeded)}
    stages = plan_stages(recipe)
    distill, teacher = stages[-1], next(s for s in stages if s.fraction == 0.1)
    assert distill.parent_id == teacher.stage_id  # the student's parent is its teacher
    assert [s.column for s in stages] == [
        "finetune_1pct_top1",
        "finetune_10pct_top1",
        "distill_top1",
    ]


# -- cl eval -----------------------------------------------------------------------------------


def test_cl_eval_trains_each_stage_once_and_report_shows_them(
    parent: RunDir, tmp_path: Path
) -> None:
    run = fresh_copy(parent, tmp_path)
    sets = [a for s in STAGES for a in ("--set", s)]
    result = invoke("eval", run.path, "--finetune", "0.05,0.1", "--supervised", "--distill", *sets)
    assert result.exit_code == 0, result.output
    folders = stage_dirs(run)
    assert len(folders) == 5 and all(f.is_done() for f in folders)
    summaries = {f.summary()["column"]: f.summary() for f in folders}
    assert (
        summaries["finetune_5pct_top1"]["num_labelled"]
        < summaries["finetune_10pct_top1"]["num_labelled"]
    )
    assert summaries["distill_top1"]["teacher_top1"] == summaries["finetune_10pct_top1"]["top1"]
    before = {f.path.name: f.summary_file.stat().st_mtime_ns for f in folders}
    again = invoke("eval", run.path, "--finetune", "0.05,0.1", "--supervised", "--distill", *sets)
    assert again.exit_code == 0
    assert {f.path.name: f.summary_file.stat().st_mtime_ns for f in stage_dirs(run)} == before
    report = build_report(load_runs(run.path))
    assert report.metrics[1:] == [
        "finetune_5pct_top1",
        "finetune_10pct_top1",
        "supervised_5pct_top1",
        "supervised_10pct_top1",
        "distill_top1",
    ]
    stats = report.groups[0].stats
    assert stats["distill_top1"].mean == summaries["distill_top1"]["top1"]


def test_cl_eval_says_when_a_stage_shares_a_report_column(parent: RunDir, tmp_path: Path) -> None:
    """A stage key that is not an ablation (here the learning rate) is not in the column name:
    ``cl eval`` says the new stage shares the column, and both stages keep their folders."""
    run = fresh_copy(parent, tmp_path / "run")
    sets = ["--set", "finetune.epochs=1"]
    first = invoke("eval", run.path, "--finetune", "0.1", *sets)
    assert first.exit_code == 0 and "shares the report column" not in first.output
    second = invoke("eval", run.path, "--finetune", "0.1", *sets, "--set", "finetune.lr=0.01")
    assert second.exit_code == 0, second.output
    old = stage_dirs(run)[0].path.name  # oldest first
    assert f"shares the report column finetune_10pct_top1 with stage {old}" in second.output
    assert len(stage_dirs(run)) == 2 and all(f.is_done() for f in stage_dirs(run))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--finetune", "0.01"], "the smallest fraction that labels every class is 0.0125"),
        (["--finetune", "1.5"], "label fraction 1.5 is outside (0, 1]"),
        (["--finetune", "0"], "label fraction 0 is outside (0, 1]"),
        (["--finetune", "0.1", "--set", "finetune.start_layer=2"], "finetune.start_layer = 2"),
        (["--finetune", "0.1", "--set", "data.image_size=32"], "data.image_size = 24"),
        (["--finetune", "0.1", "--set", "data.dataset=digits"], "same data set and image size"),
        (["--finetune", "0.1", "--set", "lr=0.1"], "stage keys only"),
        (["--set", 'stages.run=["finetuning"]'], "did you mean 'finetune'?"),
    ],
)
def test_cl_eval_bad_input_is_one_line_exit_2_nothing_written(
    parent: RunDir, tmp_path: Path, args: list[str], message: str
) -> None:
    run = fresh_copy(parent, tmp_path)
    result = invoke("eval", run.path, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (run.path / "stages").exists()


def test_cl_eval_refuses_missing_unfinished_and_failed_runs(parent: RunDir, tmp_path: Path) -> None:
    missing = invoke("eval", tmp_path / "nowhere", "--finetune", "0.1")
    assert missing.exit_code == 2 and "not a run folder" in missing.output
    for status, reason in (("failed", "RuntimeError: boom"), ("interrupted", "stopped")):
        run = fresh_copy(parent, tmp_path / status)
        run.write_state(status, reason=reason)
        result = invoke("eval", run.path, "--finetune", "0.1")
        assert result.exit_code == 2
        assert f"is {status} ({reason})" in result.output and "finished run" in result.output
        assert not (run.path / "stages").exists()


def test_kill_9_during_a_stage_then_rerun_equals_an_uninterrupted_stage(
    parent: RunDir, tmp_path: Path
) -> None:
    args = ["--finetune", "0.1", "--set", "finetune.epochs=40", "--set", "finetune.batch_size=8"]
    reference = fresh_copy(parent, tmp_path / "reference")
    assert invoke("eval", reference.path, *args).exit_code == 0
    run = fresh_copy(parent, tmp_path / "killed")
    process = start_cl("eval", str(run.path), *args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        folders = stage_dirs(run)
        state = folders[0].state() if folders else None
        if state and state.get("status") == "running" and state.get("epoch", 0) >= 3:
            break
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (stage,) = stage_dirs(run)
    assert not stage.is_done()  # killed mid-stage, its checkpoint behind
    assert invoke("eval", run.path, *args).exit_code == 0
    (expected,) = stage_dirs(reference)
    resumed, uninterrupted = stage.summary(), expected.summary()
    assert resumed["resumed_from_step"] > 0
    assert resumed["top1"] == uninterrupted["top1"]
    losses = [[r["loss"] for r in d.records() if r["kind"] == "epoch"] for d in (stage, expected)]
    assert losses[0] == losses[1] and len(losses[0]) == 40
    weights = [torch.load(d.checkpoint, weights_only=False)["net"] for d in (stage, expected)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# -- pipelines and sweeps ----------------------------------------------------------------------


def test_cl_run_of_a_pipeline_recipe_trains_its_stages(tmp_path: Path) -> None:
    pipeline = ROOT / "recipes" / "simclr_v2_pipeline.toml"
    sets = [a for s in [*PARENT, *STAGES] for a in ("--set", s)]
    result = run_cl("run", str(pipeline), *sets, "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = [RunDir(p) for p in (tmp_path / "simclr_v2_pipeline").iterdir()]
    kinds = sorted(f.summary()["column"] for f in stage_dirs(run) if f.is_done())
    assert kinds == [
        "distill_top1",
        "finetune_10pct_top1",
        "finetune_5pct_top1",
        "supervised_10pct_top1",
        "supervised_5pct_top1",
    ]
    assert "stages of run" in result.stdout and "supervised 5%" in result.stdout


def test_a_sweep_chains_stages_and_a_failed_run_blocks_them(tmp_path: Path) -> None:
    sets = [a for s in [*PARENT, *STAGES, 'stages.run=["finetune"]'] for a in ("--set", s)]
    # cuda:63 passes the recipe's checks and fails when the run starts, here and on GPU hosts
    result = run_cl(
        "sweep", str(SIMCLR_V2), "--param", 'train.device="cpu","cuda:63"', *sets,
        "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    (folder,) = (tmp_path / "sweeps").iterdir()
    rows = sweep_status(folder)
    runs = {r.params["train.device"]: r for r in rows if r.stage is None}
    assert runs["cpu"].state == "done" and runs["cuda:63"].state == "failed"
    stages = [r for r in rows if r.stage is not None]
    assert len(stages) == 4
    done = [r for r in stages if r.params["train.device"] == "cpu"]
    blocked = [r for r in stages if r.params["train.device"] == "cuda:63"]
    assert [r.state for r in done] == ["done", "done"]
    assert [r.state for r in blocked] == ["blocked", "blocked"]
    assert all(r.reason.startswith(f"blocked by {runs['cuda:63'].run_id}") for r in blocked)
    shown = run_cl("status", str(folder), cwd=tmp_path)
    assert shown.returncode == 3 and f"blocked by {runs['cuda:63'].run_id}" in shown.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [len(e["stages"]) for e in manifest["runs"]] == [2, 2]


def test_a_stage_waiting_on_a_failed_runs_job_is_blocked_and_says_scancel(tmp_path: Path) -> None:
    from cltool.runstate import BLOCKED, PENDING, RunState, stage_state

    stage_dir = RunDir(tmp_path / "stage")
    job = {"executor": "slurm", "job_id": "12"}
    waiting = stage_state(stage_dir, "abc", RunState("running"), job, {"12": "PENDING"})
    assert waiting.name == PENDING  # its run still trains: it waits, as it should
    blocked = stage_state(stage_dir, "abc", RunState("failed", "boom"), job, {"12": "PENDING"})
    assert blocked.name == BLOCKED
    assert blocked.reason == (
        "blocked by abc (failed); its SLURM job 12 waits on a dependency never met: scancel 12"
    )
    stage_dir.path.mkdir()
    stage_dir.write_state("done")
    (stage_dir.summary_file).write_text("{}")
    assert stage_state(stage_dir, "abc", RunState("failed")).name == "done"


def test_a_sweep_over_a_stage_key_is_refused_in_one_line(tmp_path: Path) -> None:
    result = invoke("sweep", SIMCLR_V2, "--param", "finetune.lr=0.01,0.1", "--out", tmp_path)
    assert result.exit_code == 2
    assert "finetune.lr is a stage key" in result.output and "cl eval RUN" in result.output
    assert not any(tmp_path.iterdir())


def test_cl_keys_documents_every_stage_key(tmp_path: Path) -> None:
    from cltool.recipe import all_keys

    listed = run_cl("keys", cwd=tmp_path)
    assert listed.returncode == 0
    rows = {line.split("│")[1].strip() for line in listed.stdout.splitlines() if "│" in line}
    stage_keys = [k for k in all_keys() if k.partition(".")[0] in ("stages", "finetune", "distill")]
    assert len(stage_keys) == 24 and set(stage_keys) <= rows
