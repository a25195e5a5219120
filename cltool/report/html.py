"""The HTML page of `cl report`: one self-contained file that opens from a laptop's disk.

Nothing is fetched: the style is inline, the figure an inline SVG scaled by its viewBox, and
the only links are relative ones to each run's ``config.toml``, ``train.log`` and
``summary.json`` (valid while the page sits where it was written, next to the runs). The page
fits the window's width: wide tables scroll inside their own box, long words wrap.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from cltool.report.group import Report, format_value, group_label
from cltool.report.load import RunRecord
from cltool.report.tables import LEGEND, table_rows

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1em auto;padding:0 1em;max-width:100%;"
    "box-sizing:border-box;overflow-wrap:anywhere}"
    ".scroll{overflow-x:auto;max-width:100%}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
    "td:first-child,th:first-child,.runs td,.runs th{text-align:left}"
    "tr.best{font-weight:bold;background:#eaf6ea}"
    "pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:.3em 0}"
    "svg{display:block}"
)
#: The files of a run folder the page links to.
RUN_FILES = ("config.toml", "train.log", "summary.json")


def to_html(
    report: Report, svg: str | None = None, base: Path | None = None, extra: str = ""
) -> str:
    """The page: the table, the figure (``svg``, from :func:`~cltool.report.figures.inline_svg`),
    ``extra`` sections (a search's trials) and every run with its state, reason, config and
    links relative to ``base`` (the folder the page is written to)."""
    esc = html.escape
    header, rows = table_rows(report)
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join(
        f"<tr{' class=best' if group.best else ''}>"
        + "".join(f"<td>{esc(cell)}</td>" for cell in row)
        + "</tr>"
        for row, group in zip(rows, report.groups, strict=True)
    )
    notes = "".join(f"<li>{esc(line)}</li>" for line in [*report.notes, *report.skipped])
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>cl report {esc(report.source)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(report.source)}</h1>",
        f"<div class=scroll><table><tr>{head}</tr>{body}</table></div><p>{esc(LEGEND)}</p>",
        f"<ul>{notes}</ul>" if notes else "",
        f"<h2>Figures</h2>{svg}" if svg else "",
        extra,
        "<h2>Runs</h2>",
    ]
    for group in report.groups:
        parts.append(f"<h3>{esc(group_label(report.keys, group))}</h3>")
        parts.append(
            "<div class=scroll><table class=runs><tr><th>run</th><th>state</th><th>reason</th>"
            "<th>files</th></tr>"
            + "".join(_run_row(run, base) for run in group.runs)
            + "</table></div>"
        )
        parts += [_config(run) for run in group.runs]
    parts.append("</body></html>\n")
    return "".join(parts)


def _run_row(run: RunRecord, base: Path | None) -> str:
    esc = html.escape
    links = []
    if run.path is not None:
        for name in RUN_FILES:
            if (run.path / name).is_file():
                target = Path(run.path, name).resolve()
                href = os.path.relpath(target, (base or Path()).resolve())
                links.append(f"<a href='{quote(Path(href).as_posix())}'>{name}</a>")
    return (
        f"<tr><td>{esc(run.run_id)}</td><td>{esc(run.status)}</td>"
        f"<td>{esc(run.reason or '')}</td><td>{' '.join(links)}</td></tr>"
    )


def _config(run: RunRecord) -> str:
    lines = "\n".join(f"{key} = {format_value(value)}" for key, value in sorted(run.config.items()))
    return (
        f"<details><summary>config of {html.escape(run.run_id)}</summary>"
        f"<pre>{html.escape(lines)}</pre></details>"
    )
