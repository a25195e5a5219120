"""The table of `cl report` in every format: rich (terminal), markdown, CSV, JSON, LaTeX.

One precision rule for every format that prints numbers as text: percentages (accuracies) to
one decimal; any other metric to the decimals that give its column's largest mean 4
significant digits; the std to the same decimals as its mean, ``–`` when n = 1. The mark
column: ``★`` the best configuration (``★ n=1`` when its mean is one run), ``≈`` a tie with it
(:data:`~cltool.report.group.TIE_RULE`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any

from cltool.report.group import (
    BASELINES,
    TIE_RULE,
    Group,
    Report,
    Stat,
    display_key,
    format_value,
    is_percent,
    metric_label,
)
from cltool.runstate import STATES
from cltool.text import plural
from cltool.track import DONE

SCHEMA = 1
BEST, TIE = "★", "≈"
#: Columns shown only when some configuration has something in them.
SPARSE = ("missing", "state", "reason")
LEGEND = (
    f"mean ± std over seeds (sample std; – at n = 1); {BEST} best, {TIE} {TIE_RULE}; "
    "baselines are kNN top-1 of a random encoder and of raw pixels"
)


def decimals(report: Report, metric: str) -> int:
    """The decimals of ``metric``'s column by the module's precision rule."""
    if is_percent(metric):
        return 1
    means = [abs(s.mean) for g in report.groups if (s := g.stats[metric]).mean is not None]
    largest = max(means, default=0.0)
    if largest == 0.0:
        return 3
    return min(max(3 - math.floor(math.log10(largest)), 0), 6)


def format_stat(stat: Stat, places: int, pm: str = " ± ", dash: str = "–") -> str:
    """``mean ± std`` at ``places`` decimals; ``dash`` for a std of n = 1 or a missing mean."""
    if stat.mean is None:
        return dash
    std = dash if stat.std is None else f"{stat.std:.{places}f}"
    return f"{stat.mean:.{places}f}{pm}{std}"


def mark(group: Group, metric: str) -> str:
    """The mark column's text of ``group``."""
    if group.best:
        return BEST if group.stats[metric].n > 1 else f"{BEST} n=1"
    return TIE if group.tie else ""


def stat_columns(report: Report) -> list[str]:
    """The metrics, then the baselines: every column of mean ± std."""
    return [*report.metrics, *report.baselines]


def _state_text(group: Group) -> str:
    """The group's runs that are not done, counted by state (empty when all are done)."""
    return ", ".join(f"{group.counts[s]} {s}" for s in STATES if s != DONE and group.counts[s])


def reason_text(group: Group) -> str:
    """The distinct one-line reasons of the group's runs that are not done."""
    reasons = dict.fromkeys(run.reason for run in group.runs if run.status != DONE)
    return "; ".join(reason for reason in reasons if reason)


def table_rows(report: Report, runs: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the rich, markdown and HTML tables; ``runs`` adds the run
    ids. The missing/state/reason columns appear only when some row fills them."""
    first = report.metrics[0]
    places = {m: decimals(report, m) for m in stat_columns(report)}
    header = [
        "best",
        *(display_key(k) for k in report.keys),
        *(metric_label(m) for m in stat_columns(report)),
        "n",
        *SPARSE,
    ]
    rows = []
    for group in report.groups:
        n = group.stats[first].n
        cells = []
        for m in stat_columns(report):
            text = format_stat(group.stats[m], places[m])
            cells.append(text if group.stats[m].n in (n, 0) else f"{text} (n={group.stats[m].n})")
        rows.append(
            [
                mark(group, first),
                *(format_value(group.values[k]) for k in report.keys),
                *cells,
                str(n),
                str(group.missing) if group.missing else "",
                _state_text(group),
                reason_text(group),
            ]
        )
    keep = [i for i, name in enumerate(header) if name not in SPARSE or any(r[i] for r in rows)]
    header = [header[i] for i in keep]
    rows = [[row[i] for i in keep] for row in rows]
    if runs:
        header.append("runs")
        for row, group in zip(rows, report.groups, strict=True):
            row.append(" ".join(run.run_id for run in group.runs))
    return header, rows


def to_markdown(report: Report, runs: bool = False) -> str:
    header, rows = table_rows(report, runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", r"\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{LEGEND}\n"


def to_rich(report: Report, runs: bool = False) -> Any:
    """A ``rich`` table (imported here: the other formats do not need rich). Every column
    folds instead of cutting, so a narrow terminal wraps a key name or a number, never
    shortens it with an ellipsis."""
    from rich.table import Table

    header, rows = table_rows(report, runs)
    numeric = {metric_label(m) for m in stat_columns(report)} | {"n", "missing"}
    table = Table(
        title=f"{report.source}: {plural(len(report.groups), 'configuration')}",
        caption=LEGEND,
        caption_justify="left",
    )
    for name in header:
        table.add_column(
            "" if name == "best" else name,
            justify="right" if name in numeric else "left",
            overflow="fold",
            min_width=len(BEST) if name == "best" else 4,
        )
    for row, group in zip(rows, report.groups, strict=True):
        table.add_row(*row, style="bold green" if group.best else None)
    return table


def to_dict(report: Report) -> dict[str, Any]:
    """The documented JSON layout (see :mod:`cltool.report`)."""
    return {
        "schema": SCHEMA,
        "source": report.source,
        "sort_metric": report.metrics[0],
        "metrics": report.metrics,
        "baselines": report.baselines,
        "tie_rule": TIE_RULE,
        "keys": report.keys,
        "not_started": report.not_started,
        "skipped": report.skipped,
        "notes": report.notes,
        "groups": [
            {
                "values": group.values,
                "stats": {
                    m: {"mean": s.mean, "std": s.std, "n": s.n} for m, s in group.stats.items()
                },
                "runs": len(group.runs),
                **group.counts,
                "expected": group.expected,
                "missing": group.missing,
                "best": group.best,
                "tie": group.tie,
                "run_ids": [run.run_id for run in group.runs],
                "run_states": {
                    run.run_id: {"state": run.status, "reason": run.reason} for run in group.runs
                },
            }
            for group in report.groups
        ],
    }


def to_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2, default=str) + "\n"


def to_csv(report: Report) -> str:
    """One row per group with full-precision numbers (a spreadsheet rounds for itself)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = stat_columns(report)
    stats_header = [f"{m}_{part}" for m in columns for part in ("mean", "std", "n")]
    tail = ["runs", *STATES, "expected", "missing", "best", "tie", "reason", "run_ids"]
    writer.writerow([*report.keys, *stats_header, *tail])
    for group in report.groups:
        stats = []
        for m in columns:
            s = group.stats[m]
            stats += ["" if s.mean is None else s.mean, "" if s.std is None else s.std, s.n]
        writer.writerow(
            [
                *(format_value(group.values[k]) for k in report.keys),
                *stats,
                len(group.runs),
                *(group.counts[s] for s in STATES),
                group.expected,
                group.missing,
                str(group.best).lower(),
                str(group.tie).lower(),
                reason_text(group),
                " ".join(run.run_id for run in group.runs),
            ]
        )
    return buffer.getvalue()


_LATEX_SPECIAL = re.compile(r"([&%$#_{}~^\\])")
_LATEX_REPLACE = {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    return _LATEX_SPECIAL.sub(lambda m: _LATEX_REPLACE.get(m.group(1), "\\" + m.group(1)), text)


def _latex_key(key: str) -> str:
    """A one-letter short name in math (``$m$``, ``$K$``), any other key as text."""
    short = display_key(key)
    return f"${short}$" if len(short) == 1 else latex_escape(short)


def to_latex(report: Report) -> str:
    """A booktabs ``tabular`` to paste into a ``table`` environment: keys, metrics and
    baselines as mean ± std, n; the best in bold, ties underlined, a legend row under it."""
    first = report.metrics[0]
    columns = stat_columns(report)
    places = {m: decimals(report, m) for m in columns}
    header = [
        *(_latex_key(k) for k in report.keys),
        *(latex_escape(metric_label(m)) for m in columns),
        "$n$",
    ]
    lines = [
        f"% cl report {latex_escape(report.source)}; needs \\usepackage{{booktabs}}",
        "\\begin{tabular}{" + "l" * len(report.keys) + "r" * (len(columns) + 1) + "}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    flagged = False
    for group in report.groups:
        cells = [latex_escape(format_value(group.values[k])) for k in report.keys]
        for m in columns:
            text = format_stat(group.stats[m], places[m], pm=" $\\pm$ ", dash="--")
            if m == first and group.best:
                text = f"\\textbf{{{text}}}"
                if group.stats[m].n < 2:
                    text += "$^\\dagger$"
                    flagged = True
            elif m == first and group.tie:
                text = f"\\underline{{{text}}}"
            cells.append(text)
        cells.append(str(group.stats[first].n))
        lines.append(" & ".join(cells) + " \\\\")
    legend = (
        "mean $\\pm$ std over $n$ seeds; \\textbf{best}; \\underline{within noise of the "
        "best} (mean $\\pm$ std intervals overlap)"
    )
    if flagged:
        legend += "; $^\\dagger$ a single run (n = 1): no std to compare"
    if report.baselines:
        legend += "; baselines: kNN top-1 of " + " and of ".join(
            BASELINES[b] for b in report.baselines
        )
    lines += [
        "\\bottomrule",
        f"\\multicolumn{{{len(header)}}}{{l}}{{\\footnotesize {legend}}} \\\\",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"
