"""`cl report` of a search: its best trials, the objective against each parameter, the
optimisation history and, where Optuna can compute them, the parameters' importances.

Read from the study in the sweep folder (:func:`cltool.search.trial_rows`): the table of
configurations (:mod:`cltool.report.group`) shows runs; this part shows trials, including the
pruned ones with their last value. Optuna and matplotlib are imported only here, when a search
is reported.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cltool.recipe import short_key
from cltool.search import TrialRow, best_rows, is_search, load_study, trial_rows
from cltool.search_space import SearchParam
from cltool.sweep import MANIFEST
from cltool.track import read_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Best trials listed.
BEST = 5


@dataclass(frozen=True)
class SearchReport:
    """A search's trials and what the report says of them."""

    objective: str
    direction: str
    space: tuple[SearchParam, ...]
    trials: list[TrialRow]
    best: list[TrialRow]
    importances: dict[str, float] | None
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.trials:
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts


def load_search(folder: Path) -> SearchReport | None:
    """The search in ``folder``; None when the folder holds no search."""
    if not is_search(folder):
        return None
    settings = (read_json(Path(folder) / MANIFEST) or {})["search"]
    rows = trial_rows(folder)
    notes = []
    importances = _importances(folder)
    if importances is None:
        notes.append("parameter importances need at least two complete trials that differ")
    return SearchReport(
        objective=settings["objective"],
        direction=settings["direction"],
        space=tuple(SearchParam.from_json(p) for p in settings["space"]),
        trials=rows,
        best=best_rows(rows, settings["direction"], BEST),
        importances=importances,
        notes=notes,
    )


def _importances(folder: Path) -> dict[str, float] | None:
    """Optuna's importances (fANOVA) over the complete trials; None where it cannot say."""
    import optuna

    study = load_study(folder)
    if study is None:
        return None
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # a single distinct point, a constant objective
        return None


def _params(row: TrialRow, space: tuple[SearchParam, ...]) -> list[str]:
    return [
        f"{row.params[p.key]:.4g}" if isinstance(row.params.get(p.key), float) else
        str(row.params.get(p.key, ""))
        for p in space
    ]  # fmt: skip


def best_table(report: SearchReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the best trials: number, run, values, objective."""
    header = ["trial", "run", *(short_key(p.key) for p in report.space), report.objective]
    rows = [
        [str(r.number), r.run_id or "", *_params(r, report.space), f"{r.value:.4g}"]
        for r in report.best
    ]
    return header, rows


def summary_text(report: SearchReport) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report.counts().items()))
    return f"search: {len(report.trials)} trials ({counts}), {report.direction} {report.objective}"


def importance_text(report: SearchReport) -> str:
    if not report.importances:
        return ""
    return "importance: " + ", ".join(
        f"{short_key(k)} {v:.2f}" for k, v in report.importances.items()
    )


def to_rich(report: SearchReport) -> Any:
    from rich.table import Table

    header, rows = best_table(report)
    table = Table(title=f"{summary_text(report)}: best trials", title_justify="left")
    for name in header:
        table.add_column(name, justify="left" if name in ("trial", "run") else "right")
    for row in rows:
        table.add_row(*row)
    table.caption = importance_text(report) or None
    return table


def to_markdown(report: SearchReport) -> str:
    header, rows = best_table(report)
    lines = [
        f"**{summary_text(report)}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if report.importances:
        lines += ["", importance_text(report)]
    return "\n".join(lines) + "\n"


def to_dict(report: SearchReport) -> dict[str, Any]:
    return {
        "objective": report.objective,
        "direction": report.direction,
        "counts": report.counts(),
        "best": [r.number for r in report.best],
        "importances": report.importances,
        "trials": [asdict(r) for r in report.trials],
    }


def to_html(report: SearchReport, svg: str | None) -> str:
    """The page's search section: the best trials' table, importances and the figure."""
    esc = html.escape
    header, rows = best_table(report)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f"<h2>Search</h2><p>{esc(summary_text(report))}</p>"
        f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"
        f"<p>{esc(importance_text(report))}</p>" + (svg or "")
    )


def search_figure(report: SearchReport) -> Figure:
    """One panel per parameter (objective against its values; pruned trials hollow, at their
    last value), the optimisation history (each trial and the best so far) and, when known,
    the importances."""
    from matplotlib.figure import Figure

    panels = len(report.space) + 1 + (1 if report.importances else 0)
    fig = Figure(figsize=(3.2 * panels, 3.0), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    complete = [r for r in report.trials if r.state == "complete" and r.value is not None]
    pruned = [r for r in report.trials if r.state == "pruned" and r.value is not None]
    for ax, param in zip(axes, report.space, strict=False):
        for rows, style in ((complete, {"color": "C0"}), (pruned, {"facecolors": "none"})):
            points = [(r.params[param.key], r.value) for r in rows if param.key in r.params]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, edgecolors="C0", **style)
        if param.log:
            ax.set_xscale("log")
        ax.set_xlabel(short_key(param.key))
        ax.set_ylabel(report.objective)
    history = axes[len(report.space)]
    ordered = sorted(complete, key=lambda r: r.number)
    pick = min if report.direction == "minimize" else max
    best_so_far, best = [], None
    for row in ordered:
        best = row.value if best is None else pick(best, row.value)
        best_so_far.append(best)
    history.scatter([r.number for r in ordered], [r.value for r in ordered], color="C0")
    history.scatter(
        [r.number for r in pruned], [r.value for r in pruned], facecolors="none", edgecolors="C0"
    )
    history.step([r.number for r in ordered], best_so_far, where="post", color="C1")
    history.set_xlabel("trial")
    history.set_ylabel(report.objective)
    history.set_title("history (hollow: pruned)", fontsize="small")
    if report.importances:
        ax = axes[-1]
        names = [short_key(k) for k in report.importances]
        ax.barh(names, list(report.importances.values()), color="C2")
        ax.invert_yaxis()
        ax.set_xlabel("importance (fANOVA)")
    return fig
