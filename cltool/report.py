"""`cl report`: one row per configuration of a sweep or a folder of runs, mean ± std over seeds.

Runs come from run folders (a sweep folder ``<out>/sweeps/<id>/`` whose ``manifest.json`` lists
its runs, or any folder searched recursively for ``config.toml``) or from the W&B public API.
Runs are grouped by the recipe keys that differ between them, leaving out the seed, the name
and the ``wandb.*`` table, so that a momentum sweep reads like the MoCo paper's momentum table.
Only ``config.toml``, ``state.json`` and ``summary.json`` are read for the table;
``metrics.jsonl`` is read only for the training curves of ``--plot``/``--html``. Broken files of
one run (a run killed mid-write) are reported in :attr:`Report.skipped` and that run is left out,
never a crash. Torch is never imported, matplotlib only when plotting.

JSON format (``--format json``; fields are stable, new ones may be added)::

    {
      "schema": 1,                      # version of this layout
      "source": "runs/sweeps/ab12",     # folder, or "wandb:ENTITY/PROJECT group=ID"
      "sort_metric": "knn_top1",        # groups are sorted by its mean, best first
      "metrics": ["knn_top1", "linear_top1"],
      "keys": ["key_encoder.m"],        # dotted recipe keys the groups differ in
      "not_started": 0,                 # manifest runs with no folder that fit no group
      "skipped": ["skipped run runs/x/ab: summary.json unreadable"],
      "groups": [{
        "values": {"key_encoder.m": 0.99},
        "stats": {"knn_top1": {"mean": 0.81, "std": 0.01, "n": 3}},   # std: sample (n-1),
                                                                      # null when n < 2
        "runs": 3,                      # runs found in this group
        "done": 3, "running": 0, "failed": 0, "interrupted": 0,
        "expected": 3,                  # seeds (or manifest runs) this group should have
        "missing": 0,                   # expected runs without a finished result
        "best": true,                   # best mean of the sort metric
        "run_ids": ["3f2a9c01de", "..."]
      }]
    }

CSV has one row per group: the dotted keys, then ``<metric>_mean``, ``<metric>_std``,
``<metric>_n`` per metric, then ``runs, done, running, failed, interrupted, expected, missing,
best``.

Training curves (``--plot``) use ``loss`` of ``epoch`` records (else the mean ``loss`` of the
epoch's ``step`` records) and ``knn_top1`` of ``epoch`` and ``eval`` records, averaged over a
group's runs.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import math
import re
import statistics
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltool.errors import CLToolError, InputError
from cltool.recipe import SHORT_NAMES, canonical_key, flatten
from cltool.text import plural
from cltool.track import (
    DONE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    RunDir,
    find_run_dirs,
    read_json,
)

DEFAULT_METRICS = ("knn_top1", "linear_top1")
MANIFEST = "manifest.json"
SCHEMA = 1
#: Keys that never split runs into groups: seeds are what a group averages over.
NOT_GROUPED = frozenset({"name", "train.seed"})
STATUSES = (DONE, RUNNING, FAILED, INTERRUPTED)
#: W&B run states mapped onto ours.
WANDB_STATES = {
    "finished": DONE,
    "running": RUNNING,
    "failed": FAILED,
    "crashed": FAILED,
    "killed": INTERRUPTED,
}
BEST = "★"


@dataclass(frozen=True)
class RunRecord:
    """What the table needs of one run; ``path`` is None for runs read from W&B."""

    run_id: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    status: str
    path: Path | None = None


@dataclass(frozen=True)
class Pending:
    """A run a sweep manifest lists whose folder does not exist yet."""

    run_id: str
    params: dict[str, Any]


@dataclass
class Loaded:
    """Runs read from one source, with per-run problems kept as messages."""

    source: str
    runs: list[RunRecord]
    skipped: list[str] = field(default_factory=list)
    manifest: bool = False
    pending: list[Pending] = field(default_factory=list)


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None
    n: int


@dataclass
class Group:
    values: dict[str, Any]
    runs: list[RunRecord]
    stats: dict[str, Stat]
    counts: dict[str, int]
    expected: int
    missing: int
    best: bool = False


@dataclass
class Report:
    source: str
    keys: list[str]
    metrics: list[str]
    groups: list[Group]
    skipped: list[str]
    not_started: int = 0


# ---------------------------------------------------------------------------------------------
# Loading


def load_runs(path: Path) -> Loaded:
    """Runs of a sweep folder (by its manifest) or of every run folder below ``path``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such folder (give a sweep folder or a folder of runs)")
    if (path / MANIFEST).is_file():
        return _load_sweep(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (give a sweep folder or a folder of runs)")
    loaded = Loaded(source=str(path), runs=[])
    for run_dir in find_run_dirs(path):
        _add_run(loaded, run_dir)
    if not loaded.runs and not loaded.skipped:
        raise InputError(
            f"{path}: no run folders found (none holds a config.toml); give a sweep folder "
            "like runs/sweeps/<id> or the folder runs are written to"
        )
    return loaded


def _load_sweep(folder: Path) -> Loaded:
    """A sweep folder: its manifest names the runs, relative to the out root (its grandparent)."""
    manifest = read_json(folder / MANIFEST)
    if manifest is None:
        raise InputError(f"{folder / MANIFEST}: unreadable or not a JSON object")
    entries = manifest.get("runs", [])
    if isinstance(entries, dict):
        entries = [{"run_id": key, **value} for key, value in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{folder / MANIFEST}: lists no runs (expected a 'runs' list)")
    out_root = folder.parent.parent
    loaded = Loaded(source=str(folder), runs=[], manifest=True)
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("run_dir"), str):
            loaded.skipped.append(f"skipped manifest entry {entry!r}: no 'run_dir'")
            continue
        run_dir = RunDir(out_root / entry["run_dir"])
        if run_dir.config.is_file():
            _add_run(loaded, run_dir)
        else:
            params = entry.get("params")
            loaded.pending.append(
                Pending(
                    run_id=str(entry.get("run_id") or entry.get("id") or run_dir.path.name),
                    params=params if isinstance(params, dict) else {},
                )
            )
    return loaded


_HEADER = re.compile(r"\[\s*([A-Za-z0-9_-]+)\s*\]")


@functools.lru_cache(maxsize=8192)
def _parse_line(line: str) -> tuple[tuple[str, Any], ...] | None:
    try:
        return tuple(flatten(tomllib.loads(line)).items())
    except tomllib.TOMLDecodeError:
        return None


def read_config(text: str) -> dict[str, Any]:
    """The flat dotted keys of a ``config.toml``.

    Parsing is most of the time of a report, and runs share most of their lines, so each
    distinct ``key = value`` line is parsed once; a file that is not one header or key per line
    (hand-edited, broken) gets a full parse, which raises ``TOMLDecodeError`` when it is broken.
    """
    flat: dict[str, Any] = {}
    prefix = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            header = _HEADER.fullmatch(line)
            if header is None:
                return flatten(tomllib.loads(text))
            prefix = header.group(1) + "."
            continue
        items = _parse_line(line)
        if items is None:
            return flatten(tomllib.loads(text))
        flat.update((prefix + key, value) for key, value in items)
    return flat


def _add_run(loaded: Loaded, run_dir: RunDir) -> None:
    """Read one run folder into ``loaded``, or say why it was skipped."""
    try:
        config = read_config(run_dir.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        loaded.skipped.append(f"skipped run {run_dir.path}: config.toml unreadable")
        return
    summary = run_dir.summary()
    if summary is None and run_dir.summary_file.exists():
        loaded.skipped.append(f"skipped run {run_dir.path}: summary.json unreadable")
        return
    state = run_dir.state()
    status = str(state.get("status", "unknown")) if state else (DONE if summary else "unknown")
    loaded.runs.append(RunRecord(run_dir.path.name, config, summary, status, run_dir.path))


def load_wandb(path: str, group: str | None, api: Any = None) -> Loaded:
    """Runs of a W&B project (``ENTITY/PROJECT``), optionally one group (a sweep id).

    ``api`` is anything with ``runs(path, filters=...)`` returning objects with ``.id``,
    ``.name``, ``.config``, ``.summary`` and ``.state``; by default ``wandb.Api()``.
    """
    filters = {"group": group} if group else {}
    source = f"wandb:{path}" + (f" group={group}" if group else "")
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=30)
        remote = list(api.runs(path, filters=filters))
    except Exception as err:  # any failure of the service or the login is one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLToolError(
            f"W&B {path}: cannot list runs ({first}); check ENTITY/PROJECT, `wandb login` "
            "and the network"
        ) from None
    if not remote:
        raise InputError(f"{source}: no runs found (check the project and the group id)")
    loaded = Loaded(source=source, runs=[])
    for run in remote:
        config = {k: v for k, v in flatten(dict(run.config)).items() if not k.startswith("_")}
        summary = {k: run.summary.get(k) for k in list(run.summary.keys()) if not k.startswith("_")}
        status = WANDB_STATES.get(str(run.state).lower(), str(run.state).lower())
        loaded.runs.append(RunRecord(str(run.id), config, summary or None, status))
    return loaded


# ---------------------------------------------------------------------------------------------
# Grouping


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Recipe keys whose value is not the same in every config (seed, name, wandb.* left out)."""
    keys: set[str] = set()
    for config in configs:
        keys.update(config)
    differ = []
    for key in sorted(keys):
        if key in NOT_GROUPED or key.startswith("wandb."):
            continue
        if len({_hashable(config.get(key)) for config in configs}) > 1:
            differ.append(key)
    return differ


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _stat(values: list[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


def build_report(
    loaded: Loaded,
    metrics: Sequence[str] = DEFAULT_METRICS,
    group_by: Sequence[str] | None = None,
) -> Report:
    """Group the runs, compute mean ± std and n per metric, count missing seeds, mark the best."""
    metrics = list(metrics) or list(DEFAULT_METRICS)
    if not loaded.runs:
        why = f"{len(loaded.skipped)} unreadable" if loaded.skipped else "none started yet"
        raise InputError(f"{loaded.source}: no runs to report ({why})")
    _check_metrics(loaded.runs, metrics)
    if group_by:
        keys = [canonical_key(key, "--group-by") for key in group_by]
    else:
        keys = differing_keys([run.config for run in loaded.runs])
    buckets: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run in loaded.runs:
        buckets[tuple(_hashable(run.config.get(k)) for k in keys)].append(run)
    pending_per_group, not_started = _place_pending(loaded.pending, keys, buckets)
    all_seeds = {_hashable(run.config.get("train.seed")) for run in loaded.runs}
    groups = []
    for signature, runs in buckets.items():
        done = [run for run in runs if run.status == DONE and run.summary is not None]
        stats = {
            m: _stat([v for run in done if (v := _number(run.summary.get(m))) is not None])
            for m in metrics
        }
        counts = {status: sum(run.status == status for run in runs) for status in STATUSES}
        if loaded.manifest:
            expected = len(runs) + pending_per_group.get(signature, 0)
            missing = max(expected - len(done), 0)
        else:
            expected = len(all_seeds)
            missing = len(all_seeds - {_hashable(run.config.get("train.seed")) for run in done})
        values = {k: runs[0].config.get(k) for k in keys}
        groups.append(Group(values, runs, stats, counts, expected, missing))
    groups.sort(key=lambda g: _sort_key(g, metrics[0]))
    if groups and groups[0].stats[metrics[0]].mean is not None:
        groups[0].best = True
    return Report(loaded.source, keys, metrics, groups, list(loaded.skipped), not_started)


def _check_metrics(runs: Iterable[RunRecord], metrics: Sequence[str]) -> None:
    """Fail on a metric no finished run reports: a typo, not a missing result."""
    available: set[str] = set()
    for run in runs:
        if run.summary:
            available.update(k for k, v in run.summary.items() if _number(v) is not None)
    unknown = [m for m in metrics if m not in available]
    if available and unknown:
        raise InputError(
            f"--metric {unknown[0]}: no run reports it; summaries have: "
            + ", ".join(sorted(available))
        )


def _place_pending(
    pending: list[Pending], keys: list[str], buckets: dict[tuple, list[RunRecord]]
) -> tuple[dict[tuple, int], int]:
    """Count not-yet-started manifest runs per group; those whose params miss a key fit none."""
    per_group: dict[tuple, int] = defaultdict(int)
    not_started = 0
    for entry in pending:
        params = {SHORT_NAMES.get(k, k): v for k, v in flatten(entry.params).items()}
        signature = tuple(_hashable(params.get(k)) for k in keys)
        if all(k in params for k in keys) and signature in buckets:
            per_group[signature] += 1
        else:
            not_started += 1
    return per_group, not_started


def _sort_key(group: Group, metric: str) -> tuple:
    mean = group.stats[metric].mean
    return (mean is None, -(mean or 0.0), json.dumps(group.values, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------
# Formats


def display_key(key: str) -> str:
    """The short name of a key where it has one (``m`` for ``key_encoder.m``)."""
    return {v: k for k, v in SHORT_NAMES.items()}.get(key, key)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "–"
    return str(value)


def format_stat(stat: Stat, show_n: bool = False) -> str:
    if stat.mean is None:
        return "–"
    text = f"{stat.mean:.4g}" if stat.std is None else f"{stat.mean:.4g} ± {stat.std:.2g}"
    return f"{text} (n={stat.n})" if show_n else text


def _state_text(group: Group) -> str:
    parts = [f"{group.counts[s]} {s}" for s in (RUNNING, FAILED, INTERRUPTED) if group.counts[s]]
    return ", ".join(parts)


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the rich, markdown and HTML tables."""
    first = report.metrics[0]
    header = [
        "best",
        *(display_key(k) for k in report.keys),
        *report.metrics,
        "n",
        "missing",
        "state",
    ]
    rows = []
    for group in report.groups:
        n = group.stats[first].n
        rows.append(
            [
                BEST if group.best else "",
                *(format_value(group.values[k]) for k in report.keys),
                *(format_stat(group.stats[m], group.stats[m].n != n) for m in report.metrics),
                str(n),
                str(group.missing) if group.missing else "",
                _state_text(group),
            ]
        )
    return header, rows


def to_markdown(report: Report) -> str:
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", r"\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_rich(report: Report) -> Any:
    """A ``rich`` table (imported here: the other formats do not need rich)."""
    from rich.table import Table

    header, rows = table_rows(report)
    table = Table(title=f"{report.source}: {plural(len(report.groups), 'configuration')}")
    for name in header:
        numeric = name in report.metrics or name in ("n", "missing")
        table.add_column("" if name == "best" else name, justify="right" if numeric else "left")
    for row, group in zip(rows, report.groups, strict=True):
        table.add_row(*row, style="bold green" if group.best else None)
    return table


def to_dict(report: Report) -> dict[str, Any]:
    """The documented JSON layout (see the module docstring)."""
    return {
        "schema": SCHEMA,
        "source": report.source,
        "sort_metric": report.metrics[0],
        "metrics": report.metrics,
        "keys": report.keys,
        "not_started": report.not_started,
        "skipped": report.skipped,
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
                "run_ids": [run.run_id for run in group.runs],
            }
            for group in report.groups
        ],
    }


def to_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2, default=str) + "\n"


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stat_columns = [f"{m}_{part}" for m in report.metrics for part in ("mean", "std", "n")]
    tail = ["runs", *STATUSES, "expected", "missing", "best"]
    writer.writerow([*report.keys, *stat_columns, *tail])
    for group in report.groups:
        stats = []
        for m in report.metrics:
            s = group.stats[m]
            stats += ["" if s.mean is None else s.mean, "" if s.std is None else s.std, s.n]
        writer.writerow(
            [
                *(format_value(group.values[k]) for k in report.keys),
                *stats,
                len(group.runs),
                *(group.counts[s] for s in STATUSES),
                group.expected,
                group.missing,
                str(group.best).lower(),
            ]
        )
    return buffer.getvalue()


def to_html(report: Report, png: bytes | None) -> str:
    """A self-contained page: the table and, when given, the plots embedded as a PNG."""
    header, rows = table_rows(report)
    esc = html.escape
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    image = ""
    if png:
        image = f'<img alt="plots" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    notes = "".join(f"<li>{esc(line)}</li>" for line in report.skipped)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>cl report {esc(report.source)}</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>{esc(report.source)}</h1><table><tr>{head}</tr>{body}</table>"
        f"{image}{'<ul>' + notes + '</ul>' if notes else ''}</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Plots


def read_curves(path: Path) -> tuple[dict[int, float], dict[int, float], int]:
    """Loss and kNN accuracy per epoch from one ``metrics.jsonl``, and its unreadable lines."""
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
        loss, acc = _number(record.get("loss")), _number(record.get("knn_top1"))
        if kind == "epoch" and loss is not None:
            epoch_loss[epoch] = loss
        elif kind == "step" and loss is not None:
            step_losses[epoch].append(loss)
        if kind in ("epoch", "eval") and acc is not None:
            knn[epoch] = acc
    loss_curve = {e: statistics.fmean(v) for e, v in step_losses.items()} | epoch_loss
    return loss_curve, knn, bad


def _group_label(report: Report, group: Group) -> str:
    return ", ".join(f"{display_key(k)}={format_value(group.values[k])}" for k in report.keys)


def _mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    epochs = sorted({e for curve in curves for e in curve})
    return epochs, [statistics.fmean(c[e] for c in curves if e in c) for e in epochs]


def render_plots(report: Report) -> bytes:
    """One PNG: each metric against each grouping key with error bars, then training curves.

    Curve problems (unreadable lines of a ``metrics.jsonl``) are added to ``report.skipped``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, k) for m in report.metrics for k in report.keys]
    curves = _collect_curves(report)
    n_panels = len(panels) + 2
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    flat_axes = list(axes.flat)
    for ax, (metric, key) in zip(flat_axes, panels, strict=False):
        _plot_metric_vs_key(ax, report, metric, key)
    for ax, (title, index) in zip(
        flat_axes[len(panels) :], (("training loss", 0), ("kNN top-1", 1)), strict=False
    ):
        for label, pair in curves.items():
            if pair[index]:
                ax.plot(*_mean_curve(pair[index]), label=label or "all runs")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if 0 < len(curves) <= 10 and ax.lines:
            ax.legend(fontsize="small")
    for ax in flat_axes[n_panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _collect_curves(report: Report) -> dict[str, tuple[list, list]]:
    curves: dict[str, tuple[list, list]] = {}
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
        curves[_group_label(report, group)] = (losses, knns)
    return curves


def _plot_metric_vs_key(ax: Any, report: Report, metric: str, key: str) -> None:
    """Mean ± std of ``metric`` at each value of ``key``, one line per value of the other keys."""
    others = [k for k in report.keys if k != key]
    series: dict[str, list[tuple[Any, Stat]]] = defaultdict(list)
    for group in report.groups:
        label = ", ".join(f"{display_key(k)}={format_value(group.values[k])}" for k in others)
        series[label].append((group.values[key], group.stats[metric]))
    ticks = sorted({_hashable(g.values[key]) for g in report.groups}, key=_order)
    position = {value: i for i, value in enumerate(ticks)}
    for label, points in series.items():
        points = sorted(
            (p for p in points if p[1].mean is not None), key=lambda p: _order(_hashable(p[0]))
        )
        if not points:
            continue
        ax.errorbar(
            [position[_hashable(v)] for v, _ in points],
            [s.mean for _, s in points],
            yerr=[s.std or 0.0 for _, s in points],
            marker="o",
            capsize=3,
            label=label or None,
        )
    ax.set_xticks(range(len(ticks)), [format_value(t) for t in ticks])
    ax.set_xlabel(display_key(key))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {display_key(key)}")
    if 1 < len(series) <= 10:
        ax.legend(fontsize="small")


def _order(value: Any) -> tuple:
    """Numbers in numeric order before everything else in text order."""
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))
