"""The ``cl report`` and ``cl sync`` commands, registered on the main Typer app by ``cli.py``.

Only Typer, rich and the shared CLI helpers are imported at module level: the report path loads
:mod:`cltool.report` (no torch, no wandb) when it runs, and wandb is imported only by
``--wandb`` and ``cl sync``, so that ``cl --help`` and ``cl report`` stay fast. Errors are one
line on stderr and a non-zero exit.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cltool.cli_common import one_line_errors
from cltool.errors import InputError
from cltool.text import plural

if TYPE_CHECKING:
    from cltool.report import Report


class Format(enum.StrEnum):
    table = "table"
    markdown = "markdown"
    csv = "csv"
    json = "json"
    latex = "latex"


REPORT_HELP = """Summarise runs: one row per configuration, mean ± std over seeds.

Runs are grouped by the recipe keys that differ between them (seed and name left out);
the table shows each metric's mean ± std (sample std, – at n = 1), n, the baselines (kNN of
a random encoder and of raw pixels), missing seeds and runs still running or failed, sorted
by the first metric. ★ marks the best (★ n=1 when it is a single run), ≈ a tie: its
mean ± std overlaps the best's (both n ≥ 2). Broken run folders are skipped with a line.

Examples:

    cl report runs/sweeps/SWEEP_ID

    cl report runs/ --metric knn_top1 --group-by m --format markdown

    cl report runs/sweeps/SWEEP_ID --plot fig.pdf --html report.html --format latex

    cl report --wandb ENTITY/PROJECT --group SWEEP_ID
"""

SYNC_HELP = """Upload offline W&B runs under PATH that are not synced yet.

Needs a W&B API key (`wandb login` or WANDB_API_KEY) and network: run it from a login node
after a sweep ran on compute nodes without network. Stops at the first run that fails.

Examples:

    cl sync

    cl sync runs/sweeps/SWEEP_ID --timeout 300
"""


@one_line_errors()
def report_command(
    path: Annotated[
        Path, typer.Argument(help="sweep folder, or any folder searched for run folders")
    ] = Path("runs"),
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", help="summary metric to show (repeatable; the first sorts)"),
    ] = None,
    group_by: Annotated[
        list[str] | None,
        typer.Option(
            "--group-by", help="recipe keys to group by (repeatable; default: keys that differ)"
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="output format")] = Format.table,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="write the table to this file (table: as markdown)"),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="figure of metrics vs swept values and curves: .png, .svg or .pdf"
        ),
    ] = None,
    html_page: Annotated[
        Path | None,
        typer.Option("--html", help="one self-contained page: table, figure, runs and configs"),
    ] = None,
    runs: Annotated[
        bool, typer.Option("--runs", help="add the run ids of each configuration")
    ] = False,
    wandb_path: Annotated[
        str | None,
        typer.Option("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead"),
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", help="W&B group (the sweep id) with --wandb")
    ] = None,
) -> None:
    from cltool import report

    if plot:
        from cltool.report.figures import plot_format

        plot_format(plot)  # a bad suffix fails before any run is read
    if wandb_path:
        loaded = report.load_wandb(wandb_path, group)
    elif group:
        raise InputError("--group needs --wandb ENTITY/PROJECT")
    else:
        loaded = report.load_runs(path)
    for line in loaded.skipped:
        print(line, file=sys.stderr)
    result = report.build_report(loaded, metric, group_by)
    for line in result.notes:
        print(f"note: {line}", file=sys.stderr)
    if plot or html_page:
        _figures(result, plot, html_page)
        for line in result.skipped[len(loaded.skipped) :]:  # what the curves added
            print(line, file=sys.stderr)
    _emit(result, fmt, output, runs)


def _figures(result: Report, plot: Path | None, html_page: Path | None) -> None:
    """Write the figure (``--plot``) and the page (``--html``); matplotlib loads only here."""
    from cltool.report import figures, html

    fig = figures.report_figure(result)
    if plot:
        _write(plot, figures.figure_bytes(fig, figures.plot_format(plot)))
    if html_page:
        page = html.to_html(result, figures.inline_svg(fig), html_page.parent)
        _write(html_page, page.encode())


def _write(path: Path, data: bytes) -> None:
    """Write one output file and say so on stderr (stdout may be the table, piped on)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from None
    print(f"wrote {path}", file=sys.stderr)


def _emit(result: Report, fmt: Format, output: Path | None, runs: bool) -> None:
    """Print the table in ``fmt``, or write it to ``output`` (the table format as markdown);
    ``runs`` adds run ids to the table and markdown (CSV and JSON always have them)."""
    from cltool import report

    if fmt is Format.table and output is None:
        from cltool.display import RunConsole

        RunConsole().print(report.to_rich(result, runs))
        return
    text = {
        Format.table: lambda r: report.to_markdown(r, runs),
        Format.markdown: lambda r: report.to_markdown(r, runs),
        Format.csv: report.to_csv,
        Format.json: report.to_json,
        Format.latex: report.to_latex,
    }[fmt](result)
    if output is None:
        sys.stdout.write(text)
    else:
        _write(output, text.encode())


@one_line_errors()
def sync_command(
    path: Annotated[Path, typer.Argument(help="folder searched for offline W&B runs")] = Path(
        "runs"
    ),
    timeout: Annotated[
        float, typer.Option("--timeout", help="seconds allowed for each run's upload")
    ] = 600.0,
) -> None:
    from cltool import wandb_log

    synced = wandb_log.sync_offline(path, timeout=timeout, echo=lambda s: print(s))
    print(f"synced {plural(synced, 'offline run')}" if synced else f"{path}: nothing to sync")


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``sync`` to the main app."""
    app.command("report", help=REPORT_HELP)(report_command)
    app.command("sync", help=SYNC_HELP)(sync_command)
