"""What `cl report` shows a reader: the precision rule, baselines, best and ties, run ids,
LaTeX against a golden file, figures checked on their matplotlib objects (markers, legends
outside the data, error bars, log axes, baselines), a self-contained HTML page, and no output
cut off a terminal (tables, every command's help)."""

from __future__ import annotations

import io
import os
import re
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, run_cl
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from rich.console import Console
from test_report import cli, make_run, summary_of, table
from typer.testing import CliRunner

from cltool import report
from cltool.errors import CLToolError
from cltool.report import figures, html
from cltool.report.load import Loaded, RunRecord

GOLDEN = Path(__file__).parent / "golden"
COMMANDS = ("", "run", "keys", "sweep", "status", "report", "sync")


def record(values: dict[str, Any], seed: int, summary: dict[str, Any] | None) -> RunRecord:
    """An in-memory run (no folder), as W&B gives them."""
    config = {**values, "train.seed": seed}
    status = "done" if summary is not None else "failed"
    return RunRecord(f"r{abs(hash((str(values), seed))) % 10**6:06d}", config, summary, status)


def loaded(results: dict[Any, list[float]], key: str = "key_encoder.m") -> Loaded:
    """Runs of ``key`` = each value of ``results`` with one seed per listed kNN accuracy."""
    runs = [
        RunRecord(
            f"{value}-{seed}",
            {key: value, "train.seed": seed},
            {"knn_top1": acc, "knn_top1_random": 20.0, "knn_top1_pixels": 30.0, "loss": 0.0123},
            "done",
        )
        for value, accs in results.items()
        for seed, acc in enumerate(accs)
    ]
    return Loaded(source="sweep", runs=runs)


# ---------------------------------------------------------------------------------------------
# Tables


def test_precision_rule_one_decimal_for_percent_and_dash_at_n1() -> None:
    rep = report.build_report(loaded({0.99: [80.0, 82.0, 84.0], 0.9: [70.0]}), ["knn_top1"])
    header, rows = report.table_rows(rep)
    column = header.index("kNN top-1 (%)")
    assert [row[column] for row in rows] == ["82.0 ± 2.0", "70.0 ± –"]
    loss = report.build_report(loaded({0.99: [80.0, 82.0]}), ["loss", "knn_top1"])
    header, rows = report.table_rows(loss)
    assert rows[0][header.index("loss")] == "0.01230 ± 0.00000"  # 4 significant digits


def test_baselines_are_reference_columns_by_default() -> None:
    rep = report.build_report(loaded({0.99: [80.0, 82.0], 0.9: [70.0, 71.0]}))
    assert rep.baselines == ["knn_top1_random", "knn_top1_pixels"]
    header, rows = report.table_rows(rep)
    assert "random encoder kNN (%)" in header and "raw pixels kNN (%)" in header
    assert rows[0][header.index("raw pixels kNN (%)")] == "30.0 ± 0.0"
    asked = report.build_report(loaded({0.99: [80.0]}), ["knn_top1", "knn_top1_pixels"])
    assert asked.baselines == ["knn_top1_random"]  # not twice


def test_best_and_ties_by_overlapping_mean_std() -> None:
    rep = report.build_report(
        loaded({0.99: [80.0, 82.0, 84.0], 0.9: [78.0, 80.0], 0.5: [60.0, 61.0], 0.0: [79.0]})
    )
    marks = {g.values["key_encoder.m"]: report.tables.mark(g, "knn_top1") for g in rep.groups}
    # 79 + 1.41 >= 82 - 2: a tie; 61 + 0.7 < 80: not; n = 1 has no std: never called a tie.
    assert marks == {0.99: "★", 0.9: "≈", 0.5: "", 0.0: ""}
    md = report.to_markdown(rep)
    assert "★ best, ≈ tie: mean ± std overlaps" in md


def test_best_at_n1_is_flagged() -> None:
    rep = report.build_report(loaded({0.99: [84.0], 0.9: [80.0, 81.0]}))
    assert rep.groups[0].best and report.tables.mark(rep.groups[0], "knn_top1") == "★ n=1"
    assert not rep.groups[1].tie
    assert "$^\\dagger$ a single run" in report.to_latex(rep)


def test_run_ids_with_runs_flag_and_in_wide_formats() -> None:
    rep = report.build_report(loaded({0.99: [80.0, 82.0]}))
    assert "runs" not in report.table_rows(rep)[0]
    header, rows = report.table_rows(rep, runs=True)
    assert header[-1] == "runs" and rows[0][-1] == "0.99-0 0.99-1"
    assert "0.99-0 0.99-1" in report.to_csv(rep)
    assert "0.99-0 0.99-1" in report.to_markdown(rep, runs=True)


def test_latex_matches_golden_and_compiles_where_tex_is() -> None:
    rep = report.build_report(
        loaded({0.99: [80.0, 82.0, 84.0], 0.9: [78.0, 80.0], 0.5: [60.0, 61.0]})
    )
    text = report.to_latex(rep)
    assert text == (GOLDEN / "report.tex").read_text()
    tex = shutil.which("pdflatex")
    if tex is None:
        return  # no TeX here: the golden file is the check
    document = (
        "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
        f"{text}\\end{{document}}\n"
    )
    result = subprocess.run(
        [tex, "-interaction=nonstopmode", "-halt-on-error", "-output-directory", "/tmp"],
        input=document,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# No truncation


LONG_KEY = "extra.a_key_name_that_is_forty_chars_xxx"


def test_long_key_survives_a_pipe_at_80_columns_and_a_narrow_terminal(tmp_path: Path) -> None:
    assert len(LONG_KEY) == 40
    out = tmp_path / "runs"
    for value, seed in ((1, 0), (1, 1), (22, 0), (22, 1)):
        recipe_table = table(0.99, seed, name=f"moco{value}")
        path = make_run(out, recipe_table, summary_of(80.0 + value + seed, 85.0, seed))
        with (path / "config.toml").open("a") as handle:
            handle.write(f"\n[extra]\n{LONG_KEY.split('.')[1]} = {value}\n")
    result = run_cl("report", str(out), cwd=ROOT, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and LONG_KEY in result.stdout
    assert "102.5 ± 0.7" in result.stdout and "random encoder kNN (%)" in result.stdout
    narrow = Console(width=60, file=io.StringIO(), force_terminal=True)
    narrow.print(report.to_rich(report.build_report(report.load_runs(out))))
    assert "…" not in narrow.file.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_never_cut_in_a_pipe(command: str) -> None:
    result = run_cl(*([command] if command else []), "--help", cwd=ROOT, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout, [line for line in result.stdout.splitlines() if "…" in line]


# ---------------------------------------------------------------------------------------------
# Figures


def drawn(rep: report.Report) -> Figure:
    fig = figures.report_figure(rep)
    fig.canvas.draw()
    return fig


def all_axes(fig: Figure) -> list[Any]:
    return [ax for sub in fig.subfigs for ax in sub.axes]


def legends(fig: Figure) -> list[Any]:
    return [legend for sub in fig.subfigs for legend in sub.legends]


def assert_legends_outside_data(fig: Figure) -> None:
    box = fig.bbox
    for legend in legends(fig):
        extent = legend.get_window_extent()
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, (extent, box)
        assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, (extent, box)
        for ax in all_axes(fig):
            assert not extent.overlaps(ax.get_window_extent()), "legend over the data"
    for ax in all_axes(fig):  # and the legend leaves the data room
        assert ax.get_window_extent().width >= 2.5 * fig.dpi


def test_figure_error_bars_are_the_seed_std_with_seeds_and_baselines(tmp_path: Path) -> None:
    rep = report.build_report(loaded({0.0: [50.0, 54.0], 0.9: [70.0, 71.0], 0.99: [80.0, 84.0]}))
    fig = drawn(rep)
    (knn_ax,) = fig.subfigs[0].axes  # no run folders: no curves part
    (container,) = [c for c in knn_ax.containers if isinstance(c, ErrorbarContainer)]
    spans = sorted(seg[1][1] - seg[0][1] for seg in container.lines[2][0].get_segments())
    expected = sorted(2 * statistics.stdev(v) for v in ([50, 54], [70, 71], [80, 84]))
    assert spans == pytest.approx(expected)
    seeds = [line for line in knn_ax.lines if line.get_gid() == "seeds"]
    assert sorted(seeds[0].get_ydata()) == [50, 54, 70, 71, 80, 84]
    baselines = {line.get_gid(): line.get_ydata()[0] for line in knn_ax.lines}
    assert baselines["knn_top1_random"] == 20.0 and baselines["knn_top1_pixels"] == 30.0
    labels = [t.get_text() for t in legends(fig)[0].get_texts()]
    assert "random encoder (20.0 %)" in labels and "raw pixels (30.0 %)" in labels
    assert knn_ax.get_ylabel() == "kNN top-1 (%)" and knn_ax.get_xlabel().startswith("momentum m")
    # m = 0, 0.9, 0.99: 1 - m spans two decades, so a log axis of 1 - m, m growing rightwards.
    assert knn_ax.get_xscale() == "log" and knn_ax.xaxis_inverted()
    assert [t.get_text() for t in knn_ax.get_xticklabels()] == ["0.0", "0.9", "0.99"]
    assert_legends_outside_data(fig)


def test_geometric_key_on_a_log_axis_and_noise_not_magnified() -> None:
    rep = report.build_report(loaded({1024: [80.0, 80.2], 4096: [80.1, 80.3]}, "dictionary.K"))
    ax = drawn(rep).subfigs[0].axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "queue size K (log scale)"
    low, high = ax.get_ylim()
    assert high - low >= figures.MIN_PERCENT_SPAN


def test_curves_from_one_epoch_with_one_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    one = [
        {"kind": "epoch", "epoch": 0, "global_step": 10, "loss": 2.9},
        {"kind": "eval", "epoch": 0, "global_step": 10, "knn_top1": 40.0},
    ]
    for m, seed in ((0.9, 0), (0.9, 1), (0.99, 0), (0.99, 1)):
        make_run(out, table(m, seed), summary_of(40.0 + seed, 45.0, seed), records=one)
    fig = drawn(report.build_report(report.load_runs(out)))
    loss_ax, knn_ax = fig.subfigs[1].axes
    curves = [line for line in knn_ax.lines if not line.get_label().startswith("_")]
    assert sorted(line.get_label() for line in curves) == ["m=0.9", "m=0.99"]
    for line in curves:
        assert line.get_marker() == "o" and list(line.get_xdata()) == [1]  # epoch 1 of 1
    assert knn_ax.get_xlabel() == "epoch" and loss_ax.get_ylabel() == "training loss"
    assert_legends_outside_data(fig)


@pytest.mark.parametrize(("n_keys", "n_configs"), [(1, 1), (2, 6), (6, 20)])
def test_figure_stays_readable_with_many_keys_and_configs(n_keys: int, n_configs: int) -> None:
    keys = [f"loss.k{i}" for i in range(n_keys)]
    runs = [
        RunRecord(
            f"c{c}s{s}",
            {**{k: c if i == 0 else (c >> i) % 2 for i, k in enumerate(keys)}, "train.seed": s},
            {"knn_top1": 50.0 + c + s, "knn_top1_random": 20.0},
            "done",
        )
        for c in range(n_configs)
        for s in range(2)
    ]
    rep = report.build_report(Loaded("many", runs))
    assert len(rep.groups) == n_configs
    if not rep.keys:
        with pytest.raises(CLToolError, match="nothing to plot"):
            figures.report_figure(rep)
        return
    fig = drawn(rep)
    assert_legends_outside_data(fig)
    width, height = fig.get_size_inches()
    assert width <= 16 and height <= 12


def test_plot_suffix_picks_the_format(tmp_path: Path) -> None:
    assert figures.plot_format(Path("a.SVG")) == "svg"
    with pytest.raises(CLToolError, match=r"give a \.png, \.svg or \.pdf") as info:
        figures.plot_format(Path("a.jpg"))
    assert info.value.exit_code == 2
    result = CliRunner().invoke(cli(), ["report", str(tmp_path), "--plot", "a.jpg"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --plot a.jpg: give a .png")
    assert len(result.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# HTML


class Refs(HTMLParser):
    """Every URL-valued attribute of a page, by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src", "xlink:href") and value is not None:
                self.refs.append((tag, name, value))


def page_of(tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "runs"
    for m, seed in ((0.9, 0), (0.9, 1), (0.99, 0), (0.99, 1)):
        make_run(out, table(m, seed), summary_of(40.0 + seed + 10 * m, 45.0, seed))
    (next((out / "moco").iterdir()) / "train.log").write_text("epoch 1/3\n")
    page = tmp_path / "site" / "report.html"
    result = run_cl("report", str(out), "--html", str(page), "--plot", "r.svg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return page, page.read_text()


def test_html_is_one_self_contained_file(tmp_path: Path) -> None:
    page, text = page_of(tmp_path)
    assert not re.search(r"https?://", text)
    parser = Refs()
    parser.feed(text)
    assert parser.refs, "links to each run's files"
    for tag, name, value in parser.refs:
        assert (tag, name) not in {("script", "src"), ("link", "href"), ("img", "src")}
        if value.startswith("#"):
            continue  # inside the inline SVG
        assert tag == "a" and value.rsplit("/", 1)[-1] in html.RUN_FILES, value
        assert (page.parent / value).resolve().is_file(), value
    assert text.count("<svg") == 1 and 'width="100%"' in text and "viewBox" in text
    assert "max-width:100%" in text and "overflow-x:auto" in text
    assert "train.log" in text and "config of " in text and "key_encoder.m = 0.99" in text
    assert (tmp_path / "r.svg").read_text().startswith("<?xml")


def chromium() -> str | None:
    return next(
        (p for n in ("chromium-headless-shell", "chromium") if (p := shutil.which(n))), None
    )


@pytest.mark.skipif(chromium() is None, reason="no headless Chromium (apt: chromium)")
def test_html_has_no_horizontal_scroll_at_1000_px(tmp_path: Path) -> None:
    page, text = page_of(tmp_path)
    probe = page.with_name("probe.html")  # the page plus a script that writes its widths
    script = (
        "<script>document.body.setAttribute('data-widths',"
        "document.documentElement.scrollWidth+'x'+window.innerWidth)</script>"
    )
    probe.write_text(text.replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,800"]
    result = subprocess.run(
        [chromium(), *flags, "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    found = re.search(r'data-widths="(\d+)x(\d+)"', result.stdout)
    assert found, result.stderr[-2000:]
    scroll, window = map(int, found.groups())
    assert window == 1000 and scroll <= window, (scroll, window)


if __name__ == "__main__":  # regenerate the golden LaTeX file after a deliberate change
    rep = report.build_report(
        loaded({0.99: [80.0, 82.0, 84.0], 0.9: [78.0, 80.0], 0.5: [60.0, 61.0]})
    )
    GOLDEN.mkdir(exist_ok=True)
    (GOLDEN / "report.tex").write_text(report.to_latex(rep))
    sys.exit(0)


def test_messages_keep_commands_on_one_line_off_a_terminal(monkeypatch: Any) -> None:
    """The W&B offline hint's `cl sync PATH` broke across lines in SLURM logs."""
    from cltool.display import Display, RunConsole

    monkeypatch.setenv("COLUMNS", "80")
    buffer = io.StringIO()
    hint = "W&B: logging offline to runs/moco/" + "a" * 60 + "/wandb; upload later with `cl sync x`"
    Display(RunConsole(file=buffer), log_path=None).message(hint)
    assert buffer.getvalue() == hint + "\n"


def test_gallery_script_parses() -> None:
    script = ROOT / "docs" / "gallery" / "make.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    assert os.access(script, os.X_OK)
