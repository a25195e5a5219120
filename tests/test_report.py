"""`cl report`: grouping and statistics against hand-computed numbers, every format read back,
broken run folders skipped with a message, plots written, no torch imported, and the W&B path
through fakes of the public API's run objects (no W&B server exists here)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import hold
from typer.testing import CliRunner

from cltool import report
from cltool.cli_report import register
from cltool.errors import CLToolError
from cltool.recipe import flatten, resolve, to_toml
from cltool.track import RunDir, atomic_write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (m, seed) -> knn_top1, linear_top1; m=0.9 seed 2 is still running.
RESULTS = {
    (0.99, 0): (80.0, 85.0),
    (0.99, 1): (82.0, 86.0),
    (0.99, 2): (84.0, 87.0),
    (0.9, 0): (70.0, 75.0),
    (0.9, 1): (71.0, 76.0),
}


def summary_of(knn: float, lin: float, seed: int) -> dict[str, float]:
    """A finished run's summary, with the baselines every run measures."""
    return {
        "knn_top1": knn,
        "linear_top1": lin,
        "knn_top1_random": 20.0 + seed,
        "knn_top1_pixels": 30.0,
    }


def table(m: float, seed: int, name: str = "moco") -> dict[str, Any]:
    return {"name": name, "key_encoder": {"m": m}, "train": {"seed": seed, "epochs": 3}}


def make_run(
    out: Path,
    recipe_table: dict[str, Any],
    summary: dict[str, Any] | None,
    status: str = "done",
    records: list[dict[str, Any]] | None = None,
) -> Path:
    """A run folder as the trainer leaves it: config.toml, state.json, summary and metrics."""
    recipe = resolve(recipe_table)
    path = out / recipe.name / recipe.fingerprint
    path.mkdir(parents=True)
    (path / "config.toml").write_text(to_toml(recipe))
    atomic_write_json(path / "state.json", {"status": status})
    if status == "running":  # held by a live process: this one
        hold(RunDir(path), socket.gethostname(), os.getpid())
    if summary is not None:
        atomic_write_json(path / "summary.json", summary)
    lines = records if records is not None else default_records(summary)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def default_records(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    knn = (summary or {}).get("knn_top1", 50.0)
    return [
        {"kind": "step", "epoch": 0, "global_step": 5, "loss": 3.0},
        {"kind": "epoch", "epoch": 0, "global_step": 10, "loss": 2.9},
        {"kind": "epoch", "epoch": 1, "global_step": 20, "loss": 2.5, "knn_top1": knn - 5},
        {"kind": "epoch", "epoch": 2, "global_step": 30, "loss": 2.2},
        {"kind": "eval", "epoch": 2, "global_step": 30, "knn_top1": knn},
    ]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    for (m, seed), (knn, lin) in RESULTS.items():
        make_run(out, table(m, seed), summary_of(knn, lin, seed))
    make_run(out, table(0.9, 2), None, status="running")
    return out


def group_of(rep: report.Report, m: float) -> report.Group:
    return next(g for g in rep.groups if g.values["key_encoder.m"] == m)


def test_groups_by_the_differing_key_with_mean_std_n(runs: Path) -> None:
    rep = report.build_report(report.load_runs(runs))
    assert rep.keys == ["key_encoder.m"]
    high, low = group_of(rep, 0.99), group_of(rep, 0.9)
    assert high.stats["knn_top1"] == report.Stat(82.0, 2.0, 3)
    assert high.stats["linear_top1"] == report.Stat(86.0, 1.0, 3)
    assert low.stats["knn_top1"].mean == pytest.approx(70.5)
    assert low.stats["knn_top1"].std == pytest.approx(math.sqrt(0.5))
    assert low.stats["knn_top1"].n == 2
    assert [g.values["key_encoder.m"] for g in rep.groups] == [0.99, 0.9]
    assert high.best and not low.best
    assert (high.missing, low.missing) == (0, 1)
    assert low.counts["running"] == 1 and low.counts["done"] == 2


def test_single_run_has_no_std_and_explicit_group_by(runs: Path) -> None:
    rep = report.build_report(report.load_runs(runs), ["knn_top1"], group_by=["seed"])
    # Runs of one seed differ in m: never averaged silently, m becomes a column with a note.
    assert rep.keys == ["train.seed", "key_encoder.m"]
    assert len(rep.notes) == 1 and "differ in m" in rep.notes[0]
    seed2 = next(g for g in rep.groups if g.values["train.seed"] == 2)
    assert seed2.stats["knn_top1"] == report.Stat(84.0, None, 1)


def test_group_by_never_merges_runs_that_differ_in_other_keys(tmp_path: Path) -> None:
    """Issue: `--group-by m` averaged runs that differed in epochs and num_train. Keys that do
    not change results (log and checkpoint periods, threads, device, W&B) still group."""
    out = tmp_path / "runs"
    for seed, epochs, logging in ((0, 3, 10), (1, 3, 5), (0, 5, 10)):
        recipe_table = table(0.99, seed)
        recipe_table["train"].update(epochs=epochs, log_every_steps=logging, threads=seed + 1)
        make_run(out, recipe_table, {"knn_top1": 50.0 + epochs + seed})
    rep = report.build_report(report.load_runs(out), ["knn_top1"], group_by=["m"])
    assert rep.keys == ["key_encoder.m", "train.epochs"]
    assert rep.notes and "differ in epochs" in rep.notes[0]
    three = next(g for g in rep.groups if g.values["train.epochs"] == 3)
    assert three.stats["knn_top1"] == report.Stat(53.5, math.sqrt(0.5), 2)
    result = CliRunner().invoke(
        cli(), ["report", str(out), "--group-by", "m", "--metric", "knn_top1"]
    )
    assert result.exit_code == 0
    assert "note: --group-by m: runs of a group also differ in epochs" in result.stderr


def test_sort_metric_and_unknown_metric(runs: Path) -> None:
    rep = report.build_report(report.load_runs(runs), ["linear_top1", "knn_top1"])
    assert rep.groups[0].values["key_encoder.m"] == 0.99
    with pytest.raises(CLToolError, match="knn_top11: no run reports it; summaries have: knn"):
        report.build_report(report.load_runs(runs), ["knn_top11"])


def test_sweep_manifest_counts_runs_not_started(runs: Path) -> None:
    sweep = runs / "sweeps" / "s1"
    (sweep / "recipes").mkdir(parents=True)
    entries = [
        {"run_dir": str(p.relative_to(runs)), "params": {}}
        for p in sorted((runs / "moco").iterdir())
    ]
    for run_id, recipe_table in (
        ("notyet", table(0.99, 3)),
        ("other", {**table(0.99, 0), "loss": {"T": 0.5}}),
    ):
        (sweep / "recipes" / f"{run_id}.toml").write_text(to_toml(resolve(recipe_table)))
        entries.append({"run_id": run_id, "run_dir": f"moco/{run_id}", "params": {}})
    atomic_write_json(sweep / "manifest.json", {"runs": entries})
    rep = report.build_report(report.load_runs(sweep))
    assert rep.keys == ["key_encoder.m", "loss.T"]
    high = next(g for g in rep.groups if g.values == {"key_encoder.m": 0.99, "loss.T": 0.2})
    assert (high.expected, high.missing, high.counts["new"]) == (4, 1, 1)
    other = next(g for g in rep.groups if g.values["loss.T"] == 0.5)
    assert (other.counts["new"], other.stats["knn_top1"].n) == (1, 0)
    assert rep.not_started == 2
    assert rep.source == str(sweep)


def test_formats_read_back(runs: Path) -> None:
    rep = report.build_report(report.load_runs(runs))
    md = report.to_markdown(rep).splitlines()
    assert md[0].split("|")[1:-1] == [
        " best ",
        " m ",
        " kNN top-1 (%) ",
        " linear top-1 (%) ",
        " random encoder kNN (%) ",
        " raw pixels kNN (%) ",
        " n ",
        " missing ",
        " state ",
        " reason ",
    ]
    assert "★" in md[2] and "82.0 ± 2.0" in md[2] and "86.0 ± 1.0" in md[2]
    assert "21.0 ± 1.0" in md[2] and "30.0 ± 0.0" in md[2]
    assert "1 running" in md[3] and f"pid {os.getpid()} on {socket.gethostname()}" in md[3]

    rows = list(csv.DictReader(io.StringIO(report.to_csv(rep))))
    assert [r["key_encoder.m"] for r in rows] == ["0.99", "0.9"]
    assert float(rows[0]["knn_top1_mean"]) == 82.0 and float(rows[0]["knn_top1_std"]) == 2.0
    assert rows[0]["best"] == "true" and rows[1]["missing"] == "1"
    assert float(rows[0]["knn_top1_random_mean"]) == 21.0 and rows[1]["tie"] == "false"
    assert len(rows[0]["run_ids"].split()) == 3

    data = json.loads(report.to_json(rep))
    assert data["schema"] == 1 and data["sort_metric"] == "knn_top1"
    assert data["keys"] == ["key_encoder.m"]
    first = data["groups"][0]
    assert first["values"] == {"key_encoder.m": 0.99}
    assert first["stats"]["knn_top1"] == {"mean": 82.0, "std": 2.0, "n": 3}
    assert first["best"] is True and first["done"] == 3 and len(first["run_ids"]) == 3
    assert data["baselines"] == ["knn_top1_random", "knn_top1_pixels"]
    assert first["stats"]["knn_top1_pixels"] == {"mean": 30.0, "std": 0.0, "n": 3}
    assert first["tie"] is False and "overlaps" in data["tie_rule"]


def test_corrupt_files_are_skipped_with_a_message(runs: Path) -> None:
    broken = make_run(runs, table(0.5, 0), {"knn_top1": 1.0})
    (broken / "summary.json").write_text('{"knn_top1": 9')  # killed mid-write
    bad_config = make_run(runs, table(0.6, 0), {"knn_top1": 1.0})
    (bad_config / "config.toml").write_text("[train\nseed = ")
    loaded = report.load_runs(runs)
    assert f"skipped run {broken}: summary.json unreadable" in loaded.skipped
    assert f"skipped run {bad_config}: config.toml unreadable" in loaded.skipped
    rep = report.build_report(loaded)
    assert {g.values["key_encoder.m"] for g in rep.groups} == {0.99, 0.9}


def test_empty_or_wrong_folder_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CLToolError, match="no run folders found"):
        report.load_runs(tmp_path)
    with pytest.raises(CLToolError, match="no such folder"):
        report.load_runs(tmp_path / "nope")


def test_plot_and_html(runs: Path, tmp_path: Path) -> None:
    from cltool.report import figures, html

    victim = next((runs / "moco").iterdir())
    with (victim / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "epoch", "epo')  # half-written last line
    rep = report.build_report(report.load_runs(runs))
    fig = figures.report_figure(rep)
    png = figures.figure_bytes(fig, "png")
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert figures.figure_bytes(fig, "pdf").startswith(b"%PDF")
    assert f"run {victim}: metrics.jsonl: skipped 1 unreadable line" in rep.skipped
    page = html.to_html(rep, figures.inline_svg(fig), tmp_path)
    assert "<svg" in page and "<td>0.99</td>" in page


def test_curves_read_epoch_loss_and_knn(runs: Path) -> None:
    from cltool.report.figures import read_curves

    path = next((runs / "moco").iterdir()) / "metrics.jsonl"
    loss, knn, bad = read_curves(path)
    assert loss == {0: 2.9, 1: 2.5, 2: 2.2}
    assert sorted(knn) == [1, 2] and bad == 0


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_formats_files_and_errors(runs: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli(), ["report", str(runs), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["groups"][0]["values"] == {"key_encoder.m": 0.99}
    plot, page, out = tmp_path / "r.png", tmp_path / "r.html", tmp_path / "r.csv"
    args = ["report", str(runs), "--plot", str(plot), "--html", str(page), "-o", str(out)]
    result = runner.invoke(cli(), [*args, "--format", "csv", "--metric", "linear_top1"])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(PNG_MAGIC) and "<table>" in page.read_text()
    assert out.read_text().startswith("key_encoder.m,linear_top1_mean")
    for written in (plot, page, out):  # each file written is named, on stderr
        assert f"wrote {written}" in result.stderr.splitlines()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metric", "knn_top5"], "--metric knn_top5: no run reports it"),
        (["--group-by", "momentun"], "--group-by: unknown key 'momentun'"),
        (["--format", "xml"], "xml"),
        (["--group", "abc"], "--group needs --wandb"),
    ],
)
def test_cli_bad_input_exits_2(runs: Path, args: list[str], expected: str) -> None:
    """Every bad flag value of cl report is bad input: exit 2, as in every other command."""
    result = CliRunner().invoke(cli(), ["report", str(runs), *args])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output


def test_cli_missing_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_table_does_not_import_torch_wandb_or_matplotlib(runs: Path) -> None:
    code = (
        "import sys, typer\n"
        "from cltool.cli_report import register\n"
        "app = typer.Typer(); register(app)\n"
        f"app(['report', {str(runs)!r}], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'wandb', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "HEAVY []" in result.stdout
    assert "0.99" in result.stdout


class FakeRun:
    """The attributes of ``wandb.apis.public.Run`` that the report reads."""

    def __init__(self, recipe_table: dict[str, Any], summary: dict[str, Any], state: str):
        recipe = resolve(recipe_table)
        self.id = self.name = recipe.fingerprint
        self.config = {**recipe.to_dict(), "_wandb": {"x": 1}}
        self.summary = {**summary, "_step": 3, "status": "done"}
        self.state = state


class FakeApi:
    def __init__(self, runs: list[FakeRun]) -> None:
        self.remote = runs
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def runs(self, path: str, filters: dict[str, Any]) -> list[FakeRun]:
        self.calls.append((path, filters))
        return self.remote


def test_wandb_source_gives_the_same_table(runs: Path) -> None:
    fakes = [
        FakeRun(table(m, seed), summary_of(knn, lin, seed), "finished")
        for (m, seed), (knn, lin) in RESULTS.items()
    ]
    fakes.append(FakeRun(table(0.9, 2), {}, "running"))
    api = FakeApi(fakes)
    remote = report.build_report(report.load_wandb("me/proj", "s1", api=api))
    local = report.build_report(report.load_runs(runs))
    assert api.calls == [("me/proj", {"group": "s1"})]
    assert remote.source == "wandb:me/proj group=s1"

    def without_reason(text: str) -> list[list[str]]:  # W&B knows states, not local pids
        rows = csv.reader(io.StringIO(text))  # run ids last, in the order each source lists
        return [row[:-2] + sorted(row[-1].split()) for row in rows]

    assert without_reason(report.to_csv(remote)) == without_reason(report.to_csv(local))


def test_wandb_source_failures_are_one_line() -> None:
    class Broken:
        def runs(self, path: str, filters: dict[str, Any]) -> list[FakeRun]:
            raise ConnectionError("Name or service not known\nmore")

    with pytest.raises(CLToolError, match=r"cannot list runs \(Name or service not known\)"):
        report.load_wandb("me/proj", "s1", api=Broken())
    with pytest.raises(CLToolError, match="no runs found"):
        report.load_wandb("me/proj", "s1", api=FakeApi([]))


def test_read_config_matches_a_full_toml_parse() -> None:
    recipe = resolve({"name": "a b", "wandb": {"tags": ["x", "y=1"]}, "loss": {"T": 0.07}})
    text = to_toml(recipe)
    assert report.read_config(text) == flatten(recipe.to_dict())
    edited = text.replace("[loss]", "[loss]  # edited\ncomment = '''two\nlines'''")
    assert report.read_config(edited)["loss.comment"] == "two\nlines"
    with pytest.raises(tomllib.TOMLDecodeError):
        report.read_config("[train\nseed = ")
