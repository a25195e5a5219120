"""Grouping runs into configurations for `cl report`: mean ± std and n over seeds, missing
seeds, run states, the best configuration and the ones tied with it within the noise.

Ties: a configuration ties with the best when their ``mean ± std`` intervals overlap (sample
std, both n ≥ 2). It is the rule a reader applies to a table of mean ± std by eye, it needs no
distribution assumption, and with the 2 to 5 seeds of a sweep a t-test has little power
anyway. At n = 1 there is no std: the best is still marked, flagged ``n=1``, and nothing is
called a tie.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cltool.errors import InputError
from cltool.recipe import SHORT_NAMES, STAGE_KINDS, canonical_key
from cltool.report.load import Loaded, RunRecord
from cltool.runstate import NEW, STATES
from cltool.stages import is_stage_metric
from cltool.track import DONE

DEFAULT_METRICS = ("knn_top1", "linear_top1")
#: Reference results every run measures (``eval.baselines``), shown beside the metrics.
BASELINES = {"knn_top1_random": "random encoder", "knn_top1_pixels": "raw pixels"}
#: Keys that never split runs into groups: seeds are what a group averages over; the others
#: change how a run logs, checkpoints or where it runs, not what it learns. (``wandb.*`` too.)
NOT_GROUPED = frozenset(
    {
        "name",
        "train.seed",
        "train.log_every_steps",
        "train.checkpoint_every_steps",
        "train.threads",
        "train.device",
    }
)
TIE_RULE = "tie: mean ± std overlaps the best's mean ± std (sample std, both n ≥ 2)"
#: Labels of metrics and keys with their units, for table headers and figure axes.
METRIC_LABELS = {
    "knn_top1": "kNN top-1 (%)",
    "linear_top1": "linear top-1 (%)",
    "knn_top1_random": "random encoder kNN (%)",
    "knn_top1_pixels": "raw pixels kNN (%)",
    "wall_s": "wall time (s)",
    "imgs_per_s": "throughput (img/s)",
}
KEY_LABELS = {
    "key_encoder.m": "momentum m",
    "dictionary.K": "queue size K",
    "loss.T": "temperature T",
    "optim.lr": "learning rate",
    "optim.weight_decay": "weight decay",
    "train.batch_size": "batch size",
    "train.epochs": "epochs",
}


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None
    n: int


@dataclass
class Group:
    """One configuration: its key values, its runs and their statistics."""

    values: dict[str, Any]
    runs: list[RunRecord]
    stats: dict[str, Stat]
    counts: dict[str, int]
    expected: int
    missing: int
    best: bool = False
    tie: bool = False


@dataclass
class Report:
    source: str
    keys: list[str]
    metrics: list[str]
    groups: list[Group]
    skipped: list[str]
    notes: list[str] = field(default_factory=list)
    #: :data:`BASELINES` some run reports and that ``metrics`` does not already hold.
    baselines: list[str] = field(default_factory=list)

    @property
    def not_started(self) -> int:
        return sum(group.counts[NEW] for group in self.groups)

    @property
    def best(self) -> Group | None:
        return next((group for group in self.groups if group.best), None)


def hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def groups_runs(key: str) -> bool:
    """Whether runs that differ in ``key`` may differ in results (and so are not averaged)."""
    return key not in NOT_GROUPED and not key.startswith("wandb.")


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Recipe keys whose value is not the same in every config (seed, name, wandb.* left out)."""
    keys: set[str] = set()
    for config in configs:
        keys.update(config)
    differ = []
    for key in sorted(keys):
        if not groups_runs(key):
            continue
        if len({hashable(config.get(key)) for config in configs}) > 1:
            differ.append(key)
    return differ


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything else (bools, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def stat(values: list[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


def build_report(
    loaded: Loaded,
    metrics: Sequence[str] | None = None,
    group_by: Sequence[str] | None = None,
) -> Report:
    """Group the runs, compute mean ± std and n per metric and baseline, count missing seeds,
    mark the best and its ties.

    Without ``metrics``, the :data:`DEFAULT_METRICS` that some run reports (runs trained with
    ``eval.linear = false`` have no linear probe)."""
    if not loaded.runs:
        why = f"{len(loaded.skipped)} unreadable" if loaded.skipped else "none started yet"
        raise InputError(f"{loaded.source}: no runs to report ({why})")
    available = _available_metrics(loaded.runs)
    if metrics:
        metrics = list(metrics)
        _check_metrics(available, metrics)
    else:
        metrics = [m for m in DEFAULT_METRICS if m in available] or list(DEFAULT_METRICS[:1])
        metrics += stage_columns(available)
    baselines = [b for b in BASELINES if b in available and b not in metrics]
    notes = []
    if group_by:
        keys = [canonical_key(key, "--group-by") for key in group_by]
        hidden = sorted(
            {
                key
                for runs in _bucket(loaded.runs, keys).values()
                for key in differing_keys([run.config for run in runs])
            }
            - set(keys)
        )
        if hidden:
            notes.append(
                f"--group-by {', '.join(group_by)}: runs of a group also differ in "
                f"{', '.join(display_key(k) for k in hidden)}; shown as columns, so that no "
                "mean mixes them (give them to --group-by too, or report a narrower folder)"
            )
            keys += hidden
    else:
        keys = differing_keys([run.config for run in loaded.runs])
    all_seeds = {hashable(run.config.get("train.seed")) for run in loaded.runs}
    groups = []
    for runs in _bucket(loaded.runs, keys).values():
        done = [run for run in runs if run.status == DONE and run.summary is not None]
        stats = {
            m: stat([v for run in done if (v := number(run.summary.get(m))) is not None])
            for m in [*metrics, *baselines]
        }
        counts = {state: sum(run.status == state for run in runs) for state in STATES}
        if loaded.manifest:
            expected = len(runs)
            missing = max(expected - len(done), 0)
        else:
            expected = len(all_seeds)
            missing = len(all_seeds - {hashable(run.config.get("train.seed")) for run in done})
        values = {k: runs[0].config.get(k) for k in keys}
        groups.append(Group(values, runs, stats, counts, expected, missing))
    groups.sort(key=lambda g: _sort_key(g, metrics[0]))
    mark_best(groups, metrics[0])
    return Report(loaded.source, keys, metrics, groups, list(loaded.skipped), notes, baselines)


def stage_columns(available: set[str]) -> list[str]:
    """The stages' metrics some run reports, in pipeline order (finetune, linear, supervised,
    distill), by label fraction within a kind."""

    def order(name: str) -> tuple:
        kind, _, rest = name.partition("_")
        percent = rest.partition("pct")[0]
        return (STAGE_KINDS.index(kind), number(_float(percent)) or 0.0, name)

    return sorted((m for m in available if is_stage_metric(m)), key=order)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def mark_best(groups: Sequence[Group], metric: str) -> None:
    """Mark the first group (sorted best first) as best and the groups within its noise as
    ties, by :data:`TIE_RULE`."""
    if not groups or groups[0].stats[metric].mean is None:
        return
    best = groups[0].stats[metric]
    groups[0].best = True
    if best.std is None:
        return
    for group in groups[1:]:
        other = group.stats[metric]
        if other.mean is not None and other.std is not None:
            group.tie = other.mean + other.std >= best.mean - best.std


def _bucket(runs: list[RunRecord], keys: list[str]) -> dict[tuple, list[RunRecord]]:
    """The runs by their values of ``keys``, in the order they first appear."""
    buckets: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run in runs:
        buckets[tuple(hashable(run.config.get(k)) for k in keys)].append(run)
    return buckets


def _available_metrics(runs: Iterable[RunRecord]) -> set[str]:
    """The numeric summary keys of the runs."""
    available: set[str] = set()
    for run in runs:
        if run.summary:
            available.update(k for k, v in run.summary.items() if number(v) is not None)
    return available


def _check_metrics(available: set[str], metrics: Sequence[str]) -> None:
    """Fail on a metric no finished run reports: a typo, not a missing result."""
    unknown = [m for m in metrics if m not in available]
    if available and unknown:
        raise InputError(
            f"--metric {unknown[0]}: no run reports it; summaries have: "
            + ", ".join(sorted(available))
        )


def _sort_key(group: Group, metric: str) -> tuple:
    mean = group.stats[metric].mean
    return (mean is None, -(mean or 0.0), json.dumps(group.values, sort_keys=True, default=str))


def display_key(key: str) -> str:
    """The short name of a key where it has one (``m`` for ``key_encoder.m``)."""
    return {v: k for k, v in SHORT_NAMES.items()}.get(key, key)


def key_label(key: str) -> str:
    """A key as an axis label: its meaning where known (``momentum m``), else its name."""
    return KEY_LABELS.get(key, display_key(key))


def is_percent(metric: str) -> bool:
    """Accuracies (``*top1``, ``*top5``) are percentages in ``summary.json``."""
    return re.search(r"top\d", metric) is not None


def metric_label(metric: str) -> str:
    """A metric as a header or axis label, with its unit."""
    return METRIC_LABELS.get(metric, f"{metric} (%)" if is_percent(metric) else metric)


def group_label(keys: Sequence[str], group: Group) -> str:
    """``m=0.99, K=4096`` for a group; "all runs" when nothing is swept."""
    text = ", ".join(f"{display_key(k)}={format_value(group.values[k])}" for k in keys)
    return text or "all runs"


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "–"
    return str(value)


def order(value: Any) -> tuple:
    """Numbers in numeric order before everything else in text order."""
    value_number = number(value)
    return (0, value_number, "") if value_number is not None else (1, 0.0, str(value))
