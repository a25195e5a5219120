"""Reading runs for `cl report`: run folders (a sweep's manifest, or any folder searched for
``config.toml``) and the W&B public API, into :class:`RunRecord` rows.

Only ``config.toml``, ``state.json`` and ``summary.json`` are read here; broken files of one
run (a run killed mid-write) become a line in :attr:`Loaded.skipped`, never a crash.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltool.errors import CLToolError, InputError
from cltool.recipe import flatten
from cltool.runstate import on_slurm, run_state, scheduler_states
from cltool.stages import stage_metrics
from cltool.sweep import RECIPES
from cltool.track import DONE, FAILED, INTERRUPTED, RUNNING, RunDir, find_run_dirs, read_json

MANIFEST = "manifest.json"
#: W&B run states mapped onto ours.
WANDB_STATES = {
    "finished": DONE,
    "running": RUNNING,
    "failed": FAILED,
    "crashed": FAILED,
    "killed": INTERRUPTED,
}


@dataclass(frozen=True)
class RunRecord:
    """What the table needs of one run; ``path`` is None for runs read from W&B. ``status``
    is the run's state (:mod:`cltool.runstate`), ``reason`` its one line."""

    run_id: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    status: str
    path: Path | None = None
    reason: str | None = None


@dataclass
class Loaded:
    """Runs read from one source, with per-run problems kept as messages."""

    source: str
    runs: list[RunRecord]
    skipped: list[str] = field(default_factory=list)
    manifest: bool = False


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
    """A sweep folder: its manifest names the runs, relative to the out root (its grandparent).

    Every run of the manifest is a row, whether it started or not: a run that failed before
    its folder had a ``config.toml`` (a data set root that is not there) takes its config from
    the sweep's own copy of its recipe, so its swept values and its reason are shown."""
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
    slurm = any(isinstance(e, dict) and on_slurm(e.get("submissions") or []) for e in entries)
    queue = scheduler_states() if slurm else None  # as `cl status` asks it: the same states
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("run_dir"), str):
            loaded.skipped.append(f"skipped manifest entry {entry!r}: no 'run_dir'")
            continue
        run_dir = RunDir(out_root / entry["run_dir"])
        submissions = entry.get("submissions") or [None]
        config_file = run_dir.config
        if not config_file.is_file():
            config_file = folder / RECIPES / f"{run_dir.path.name}.toml"
        _add_run(loaded, run_dir, config_file, submissions[-1], queue)
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


def _add_run(
    loaded: Loaded,
    run_dir: RunDir,
    config_file: Path | None = None,
    submission: dict[str, Any] | None = None,
    queue: dict[str, str] | None = None,
) -> None:
    """Read one run folder (its config from ``config_file``, by default its own) into
    ``loaded``, or say why it was skipped."""
    config_file = config_file or run_dir.config
    try:
        config = read_config(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        loaded.skipped.append(f"skipped run {run_dir.path}: {config_file.name} unreadable")
        return
    summary = run_dir.summary()
    if summary is None and run_dir.summary_file.exists():
        loaded.skipped.append(f"skipped run {run_dir.path}: summary.json unreadable")
        return
    stages = stage_metrics(run_dir)
    if summary is not None and stages:  # its stages' results are columns of the run's row
        summary = {**summary, **stages}
    state = run_state(run_dir, submission, queue)
    loaded.runs.append(
        RunRecord(run_dir.path.name, config, summary, state.name, run_dir.path, state.reason)
    )


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
