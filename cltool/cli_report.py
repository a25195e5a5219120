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
    from cltool.report.search import SearchReport


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
    searched = None
    if not wandb_path:
        from cltool.report.search import load_search

        searched = load_search(path)
    for line in loaded.skipped:
        print(line, file=sys.stderr)
    result = report.build_report(loaded, metric, group_by)
    for line in result.notes:
        print(f"note: {line}", file=sys.stderr)
    if plot or html_page:
        _figures(result, plot, html_page, searched)
        for line in result.skipped[len(loaded.skipped) :]:  # what the curves added
            print(line, file=sys.stderr)
    _emit(result, fmt, output, runs, searched)


def _figures(
    result: Report, plot: Path | None, html_page: Path | None, searched: SearchReport | None
) -> None:
    """Write the figure (``--plot``) and the page (``--html``); matplotlib loads only here. A
    search's figure goes next to ``--plot`` as ``<name>-search.<suffix>`` and into the page."""
    from cltool.report import figures, html
    from cltool.report import search as search_report

    fig = figures.report_figure(result)
    search_fig = search_report.search_figure(searched) if searched else None
    if plot:
        fmt = figures.plot_format(plot)
        _write(plot, figures.figure_bytes(fig, fmt))
        if search_fig is not None:
            search_plot = plot.with_name(f"{plot.stem}-search{plot.suffix}")
            _write(search_plot, figures.figure_bytes(search_fig, fmt))
    if html_page:
        extra = ""
        if searched is not None and search_fig is not None:
            extra = search_report.to_html(searched, figures.inline_svg(search_fig))
        page = html.to_html(result, figures.inline_svg(fig), html_page.parent, extra)
        _write(html_page, page.encode())


def _write(path: Path, data: bytes) -> None:
    """Write one output file and say so on stderr (stdout may be the table, piped on)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror})") from None
    print(f"wrote {path}", file=sys.stderr)


def _emit(
    result: Report, fmt: Format, output: Path | None, runs: bool, searched: SearchReport | None
) -> None:
    """Print the table in ``fmt``, or write it to ``output`` (the table format as markdown);
    ``runs`` adds run ids to the table and markdown (CSV and JSON always have them). A search
    adds its best trials (table, markdown) or all its trials (JSON, key ``search``)."""
    import json

    from cltool import report
    from cltool.report import search as search_report

    if fmt is Format.table and output is None:
        from cltool.display import RunConsole

        RunConsole().print(report.to_rich(result, runs))
        if searched is not None:
            RunConsole().print(search_report.to_rich(searched))
        return
    text = {
        Format.table: lambda r: report.to_markdown(r, runs),
        Format.markdown: lambda r: report.to_markdown(r, runs),
        Format.csv: report.to_csv,
        Format.json: report.to_json,
        Format.latex: report.to_latex,
    }[fmt](result)
    if searched is not None and fmt in (Format.table, Format.markdown):
        text += "\n" + search_report.to_markdown(searched)
    elif searched is not None and fmt is Format.json:
        text = json.dumps({**json.loads(text), "search": search_report.to_dict(searched)}, indent=2)
    elif searched is not None:
        print(f"note: --format {fmt.value} leaves out the search's trials", file=sys.stderr)
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
