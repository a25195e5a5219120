"""`cl report`: one row per configuration of a sweep or a folder of runs, mean ± std over seeds.

The parts: :mod:`~cltool.report.load` reads runs (folders, W&B), :mod:`~cltool.report.group`
groups them and computes statistics, best and ties, :mod:`~cltool.report.tables` writes the
table (rich, markdown, CSV, JSON, LaTeX), :mod:`~cltool.report.figures` draws the figures
(matplotlib, imported only when plotting) and :mod:`~cltool.report.html` the HTML page.

Runs come from run folders (a sweep folder ``<out>/sweeps/<id>/`` whose ``manifest.json`` lists
its runs, or any folder searched recursively for ``config.toml``) or from the W&B public API.
Runs are grouped by the recipe keys that differ between them, leaving out the seed, the name,
the ``wandb.*`` table and the keys that do not change what a run learns (logging and checkpoint
periods, threads, device), so that a momentum sweep reads like the MoCo paper's momentum table.
``--group-by`` never averages silently: keys that still differ within a group become columns
too, with a note saying so. Every run of a sweep is a row of its configuration, with its state
(:mod:`cltool.runstate`: failed, lost, interrupted, ... with their one-line reasons), so a swept
value whose runs all failed still shows, with why.
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
      "baselines": ["knn_top1_random", "knn_top1_pixels"],   # reference results, in stats too
      "tie_rule": "tie: mean ± std overlaps ...",              # how "tie" is decided
      "keys": ["key_encoder.m"],        # dotted recipe keys the groups differ in
      "not_started": 0,                 # runs in state "new"
      "skipped": ["skipped run runs/x/ab: summary.json unreadable"],
      "notes": [],                      # e.g. keys --group-by had to add as columns
      "groups": [{
        "values": {"key_encoder.m": 0.99},
        "stats": {"knn_top1": {"mean": 0.81, "std": 0.01, "n": 3}},   # std: sample (n-1),
                                                                      # null when n < 2
        "runs": 3,                      # runs found in this group
        "done": 3, "running": 0, ...    # a count for every state of cltool.runstate.STATES
        "expected": 3,                  # seeds (or manifest runs) this group should have
        "missing": 0,                   # expected runs without a finished result
        "best": true,                   # best mean of the sort metric
        "tie": false,                   # within the noise of the best (tie_rule)
        "run_ids": ["3f2a9c01de", "..."],
        "run_states": {"3f2a9c01de": {"state": "done", "reason": null}}
      }]
    }

CSV has one row per group: the dotted keys, then ``<metric>_mean``, ``<metric>_std``,
``<metric>_n`` per metric and per baseline, then ``runs``, a count per state (``done, running,
pending, submitted, interrupted, failed, lost, new``), ``expected, missing, best, tie, reason,
run_ids`` (space-separated).

Training curves (``--plot``) use ``loss`` of ``epoch`` records (else the mean ``loss`` of the
epoch's ``step`` records) and ``knn_top1`` of ``epoch`` and ``eval`` records: mean and std over
a group's runs, epochs counted from 1.
"""

from cltool.report.group import (
    BASELINES,
    DEFAULT_METRICS,
    NOT_GROUPED,
    TIE_RULE,
    Group,
    Report,
    Stat,
    build_report,
    differing_keys,
    display_key,
    groups_runs,
)
from cltool.report.load import Loaded, RunRecord, load_runs, load_wandb, read_config
from cltool.report.tables import (
    format_stat,
    table_rows,
    to_csv,
    to_dict,
    to_json,
    to_latex,
    to_markdown,
    to_rich,
)

__all__ = [
    "BASELINES",
    "DEFAULT_METRICS",
    "NOT_GROUPED",
    "TIE_RULE",
    "Group",
    "Loaded",
    "Report",
    "RunRecord",
    "Stat",
    "build_report",
    "differing_keys",
    "display_key",
    "format_stat",
    "groups_runs",
    "load_runs",
    "load_wandb",
    "read_config",
    "table_rows",
    "to_csv",
    "to_dict",
    "to_json",
    "to_latex",
    "to_markdown",
    "to_rich",
]
