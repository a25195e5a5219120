"""The figures of `cl report`: matplotlib :class:`~matplotlib.figure.Figure` objects on an Agg
canvas (no pyplot, no global state), which tests inspect before anything is saved.

One figure, two parts:

- *results*: each metric against the swept key with the most values, mean ± std error bars
  (sample std over seeds) and each seed as a point; with more keys, one line per combination
  of the others. The x axis is logarithmic for geometric keys (K, lr, weight decay, batch
  size) and for positive values spanning two decades or more; a momentum whose ``1 − m``
  spans a decade or more (0.9, 0.99, 0.999) is drawn on a log axis of ``1 − m``, labelled with
  the values of m, as papers draw it. kNN panels carry the baselines (random encoder, raw
  pixels) as labelled dashed lines. A percentage axis spans at least 10 points, so that noise
  between seeds does not look like an effect.
- *training curves*: loss and the kNN monitor per configuration, mean over seeds with a ±std
  band, epochs counted from 1, markers on every point of short curves (a single evaluation is
  a visible point).

Legends sit outside the axes, right of them (constrained layout makes room), and the figure
grows with the legend's entries, so 1 to 6 swept keys and 1 to 20 configurations stay
readable. Saved as PNG, SVG or PDF by the file's suffix.
"""

from __future__ import annotations

import io
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from cltool.errors import InputError
from cltool.report.group import (
    BASELINES,
    Report,
    display_key,
    format_value,
    group_label,
    hashable,
    is_percent,
    key_label,
    metric_label,
    number,
    order,
)
from cltool.text import plural
from cltool.track import DONE, RunDir

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: Keys whose values are chosen on a geometric grid: drawn on a log axis.
GEOMETRIC = frozenset(
    {"dictionary.K", "optim.lr", "optim.weight_decay", "train.batch_size", "model.width"}
)
#: Smallest span of a percentage axis, in points.
MIN_PERCENT_SPAN = 10.0
PANEL_W, PANEL_H = 4.2, 3.3
#: Inches per character of a small legend label (about 8 pt), to size the legend's room.
CHAR_W = 0.062


def plot_format(path: Path) -> str:
    """The figure format of ``--plot PATH``, by its suffix; exit 2 for any other suffix."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"--plot {path}: give a .png, .svg or .pdf file name (the suffix picks the format)"
        )
    return fmt


# ---------------------------------------------------------------------------------------------
# Curves


def read_curves(path: Path) -> tuple[dict[int, float], dict[int, float], int]:
    """Loss and kNN accuracy per epoch (counted from 0, as logged) from one
    ``metrics.jsonl``, and its unreadable lines."""
    epoch_loss: dict[int, float] = {}
    step_losses: dict[int, list[float]] = defaultdict(list)
    knn: dict[int, float] = {}
    bad = 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}, {}, 0
    for line in lines:
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
        except (ValueError, KeyError, TypeError):
            bad += bool(line.strip())
            continue
        kind = record.get("kind")
        loss, acc = number(record.get("loss")), number(record.get("knn_top1"))
        if kind == "epoch" and loss is not None:
            epoch_loss[epoch] = loss
        elif kind == "step" and loss is not None:
            step_losses[epoch].append(loss)
        if kind in ("epoch", "eval") and acc is not None:
            knn[epoch] = acc
    loss_curve = {e: statistics.fmean(v) for e, v in step_losses.items()} | epoch_loss
    return loss_curve, knn, bad


Curves = dict[str, tuple[list[dict[int, float]], list[dict[int, float]]]]


def collect_curves(report: Report) -> Curves:
    """Per configuration label, the loss and kNN curves of its runs that have a folder;
    unreadable lines are added to ``report.skipped``."""
    curves: Curves = {}
    for group in report.groups:
        losses, knns = [], []
        for run in group.runs:
            if run.path is None:
                continue
            loss, knn, bad = read_curves(RunDir(run.path).metrics)
            if bad:
                report.skipped.append(
                    f"run {run.path}: metrics.jsonl: skipped {plural(bad, 'unreadable line')}"
                )
            losses += [loss] if loss else []
            knns += [knn] if knn else []
        curves[group_label(report.keys, group)] = (losses, knns)
    return curves


def band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Epochs counted from 1, the mean over runs, and the std (0 where one run has the epoch)."""
    epochs = sorted({e for curve in curves for e in curve})
    means, stds = [], []
    for epoch in epochs:
        values = [c[epoch] for c in curves if epoch in c]
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return [e + 1 for e in epochs], means, stds


# ---------------------------------------------------------------------------------------------
# The figure


def colors(count: int) -> list[Any]:
    """Distinct colours for ``count`` lines: tab10, tab20, then a sampled viridis."""
    from matplotlib import colormaps

    if count <= 10:
        return [f"C{i}" for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["viridis"](i / (count - 1)) for i in range(count)]


def report_figure(report: Report) -> Figure:
    """The results part (when a key is swept) above the training curves (when runs have
    ``metrics.jsonl``); exit 2 when there is neither."""
    curves = collect_curves(report)
    has_curves = any(losses or knns for losses, knns in curves.values())
    has_results = bool(report.keys) and any(
        g.stats[m].mean is not None for g in report.groups for m in report.metrics
    )
    if not (has_curves or has_results):
        raise InputError(f"{report.source}: nothing to plot (no swept key and no training curves)")
    x_key = _x_key(report) if has_results else None
    lines = _line_labels(report, x_key) if x_key else []
    parts: list[tuple[str, int, int]] = []  # (kind, panels, legend entries)
    if has_results:
        parts.append(("results", len(report.metrics), len(set(lines)) + 2 + len(report.baselines)))
    if has_curves:
        parts.append(("curves", 2, len(curves)))
    longest = max([len(label) for label in [*lines, *curves]] + [24])
    legend_w = min(longest * CHAR_W, 6.0) + 0.8
    width = max(panels for _, panels, _ in parts) * PANEL_W + legend_w
    heights = [max(PANEL_H, 0.25 * entries + 1.2) for _, _, entries in parts]
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(len(parts), 1, height_ratios=heights, squeeze=False)[:, 0]
    for (kind, _, _), subfig in zip(parts, subfigs, strict=True):
        if kind == "results":
            _results(subfig, report, x_key, lines)
        else:
            _curves(subfig, curves)
    return fig


def _x_key(report: Report) -> str:
    """The key drawn along x: numeric keys before others, then the most distinct values."""

    def rank(key: str) -> tuple:
        values = {hashable(g.values[key]) for g in report.groups}
        numeric = all(number(v) is not None for v in values)
        return (not numeric, -len(values), report.keys.index(key))

    return min(report.keys, key=rank)


def _line_labels(report: Report, x_key: str) -> list[str]:
    """Per group (in order), the label of its line: its values of the keys other than x."""
    others = [k for k in report.keys if k != x_key]
    return [group_label(others, g) if others else "" for g in report.groups]


def _axis(values: list[Any], key: str) -> tuple[str, Any]:
    """How ``key`` is drawn along x: ``("category"|"linear"|"log"|"one_minus", position)``
    where ``position`` maps a value to its x coordinate."""
    numbers = [number(v) for v in values]
    if any(n is None for n in numbers):
        index = {hashable(v): i for i, v in enumerate(values)}
        return "category", lambda v: index[hashable(v)]
    if len(values) < 2:
        return "linear", float
    low, high = min(numbers), max(numbers)
    gaps = [1 - n for n in numbers]
    if low >= 0 and 0.9 <= high < 1 and max(gaps) / min(gaps) >= 10:
        return "one_minus", lambda v: 1 - float(v)
    if low > 0 and (key in GEOMETRIC or high / low >= 100):
        return "log", float
    return "linear", float


def _results(fig: SubFigure, report: Report, x_key: str, labels: list[str]) -> None:
    """Each metric against ``x_key``: error bars (mean ± std), seeds as points, baselines."""
    by_hash = {hashable(g.values[x_key]): g.values[x_key] for g in report.groups}
    values = [by_hash[h] for h in sorted(by_hash, key=order)]
    kind, position = _axis(values, x_key)
    distinct = list(dict.fromkeys(labels))
    palette = dict(zip(distinct, colors(len(distinct)), strict=True))
    axes = fig.subplots(1, len(report.metrics), squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes, report.metrics, strict=True):
        for label in distinct:
            groups = sorted(
                (g for g, lab in zip(report.groups, labels, strict=True) if lab == label),
                key=lambda g: order(hashable(g.values[x_key])),
            )
            groups = [g for g in groups if g.stats[metric].mean is not None]
            if not groups:
                continue
            color = palette[label]
            container = ax.errorbar(
                [position(g.values[x_key]) for g in groups],
                [g.stats[metric].mean for g in groups],
                yerr=[g.stats[metric].std or 0.0 for g in groups],
                color=color,
                marker="o",
                capsize=4,
                label=label or "mean ± std over seeds",
            )
            handles.setdefault(label or "mean ± std over seeds", container)
            seeds = [
                (position(g.values[x_key]), v)
                for g in groups
                for run in g.runs
                if run.status == DONE
                and run.summary
                and (v := number(run.summary.get(metric))) is not None
            ]
            ax.plot(
                [x for x, _ in seeds],
                [y for _, y in seeds],
                linestyle="none",
                marker="o",
                markersize=4,
                markerfacecolor="none",
                color=color,
                alpha=0.6,
                gid="seeds",
            )
        handles.setdefault(
            "each seed",
            Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", color="0.4"),
        )
        if metric.startswith("knn"):
            for baseline, line in _baseline_lines(ax, report).items():
                handles.setdefault(baseline, line)
        _x_ticks(ax, kind, values, position)
        ax.set_xlabel(_x_label(x_key, kind))
        ax.set_ylabel(metric_label(metric))
        if is_percent(metric):
            _min_span(ax)
        ax.grid(alpha=0.3)
    others = [display_key(k) for k in report.keys if k != x_key]
    fig.suptitle(
        f"mean ± std over seeds vs {key_label(x_key)}", fontsize="medium", x=0.01, ha="left"
    )
    _legend(fig, handles, f"one line per {', '.join(others)}" if others else None)


def _baseline_lines(ax: Any, report: Report) -> dict[str, Any]:
    """Dashed lines at the mean of each baseline over every finished run of the report."""
    lines = {}
    for (baseline, name), style in zip(BASELINES.items(), ("--", ":"), strict=True):
        found = [
            v
            for g in report.groups
            for run in g.runs
            if run.status == DONE
            and run.summary
            and (v := number(run.summary.get(baseline))) is not None
        ]
        if found:
            mean = statistics.fmean(found)
            label = f"{name} ({mean:.1f} %)"
            lines[label] = ax.axhline(mean, color="0.3", linestyle=style, label=label, gid=baseline)
    return lines


def _x_ticks(ax: Any, kind: str, values: list[Any], position: Any) -> None:
    """A tick at every swept value, labelled with the value (m itself on a ``1 − m`` axis)."""
    if kind in ("log", "one_minus"):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if kind == "one_minus":
        ax.invert_xaxis()  # m grows to the right, as in the table
    ax.set_xticks([position(v) for v in values], [format_value(v) for v in values])
    if kind == "category":
        ax.set_xlim(-0.5, len(values) - 0.5)


def _x_label(key: str, kind: str) -> str:
    if kind == "one_minus":
        return f"{key_label(key)} (log scale of 1 − {display_key(key)})"
    return key_label(key) + (" (log scale)" if kind == "log" else "")


def _min_span(ax: Any) -> None:
    """Widen a percentage axis to at least :data:`MIN_PERCENT_SPAN` points within 0..100."""
    low, high = ax.get_ylim()
    if high - low >= MIN_PERCENT_SPAN:
        return
    middle = (low + high) / 2
    low = min(max(middle - MIN_PERCENT_SPAN / 2, 0.0), 100.0 - MIN_PERCENT_SPAN)
    ax.set_ylim(low, low + MIN_PERCENT_SPAN)


def _curves(fig: SubFigure, curves: Curves) -> None:
    """Loss and kNN monitor per configuration: mean over seeds with a ±std band."""
    loss_ax, knn_ax = fig.subplots(1, 2)
    palette = dict(zip(curves, colors(len(curves)), strict=True))
    handles: dict[str, Any] = {}
    for ax, index in ((loss_ax, 0), (knn_ax, 1)):
        for label, pair in curves.items():
            if not pair[index]:
                continue
            epochs, means, stds = band(pair[index])
            (line,) = ax.plot(
                epochs,
                means,
                color=palette[label],
                marker="o" if len(epochs) <= 25 else None,
                markersize=4,
                label=label,
            )
            ax.fill_between(
                epochs,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=palette[label],
                alpha=0.2,
                linewidth=0,
            )
            handles.setdefault(label, line)
            if len(epochs) == 1:  # a band of one point is invisible: an error bar instead
                ax.errorbar(epochs, means, yerr=stds, fmt="none", color=palette[label], capsize=4)
        last = max((e for pair in curves.values() for c in pair[index] for e in c), default=0)
        ax.set_xlim(0.5, last + 1.5)  # epochs 1..last+1, counted as the run prints them
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel("training loss")
    knn_ax.set_ylabel("kNN top-1 monitor (%)")
    if knn_ax.lines:
        _min_span(knn_ax)
    fig.suptitle(
        "training curves: mean over seeds, band ± std", fontsize="medium", x=0.01, ha="left"
    )
    _legend(fig, handles, "configuration")


def _legend(fig: SubFigure, handles: dict[str, Any], title: str | None = None) -> None:
    """One legend for the part, outside the axes on the right."""
    if not handles:
        return
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside right upper",
        fontsize="small",
        title=title,
        title_fontsize="small",
    )


# ---------------------------------------------------------------------------------------------
# Saving


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure in ``fmt`` (png, svg, pdf), with no date in it, so that reruns compare."""
    buffer = io.BytesIO()
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    fig.savefig(buffer, format=fmt, dpi=120, metadata=metadata)
    return buffer.getvalue()


_SVG_START = re.compile(r".*?(<svg\b)", re.S)


def inline_svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element for an HTML page: no XML prolog, no metadata, no
    namespace URLs, scaled to the page's width by its viewBox."""
    text = figure_bytes(fig, "svg").decode()
    text = _SVG_START.sub(r"\1", text, count=1)
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    return re.sub(
        r'<svg\b([^>]*?)\swidth="[^"]*"\s+height="[^"]*"',
        r'<svg\1 width="100%" style="height:auto;max-width:100%"',
        text,
        count=1,
    )
