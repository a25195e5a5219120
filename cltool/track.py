"""The run folder: the source of truth for every run, written so that a crash loses nothing.

Layout of ``<out>/<recipe name>/<run id>/``:

- ``config.toml``   the resolved recipe (every key), enough to reproduce the run
- ``state.json``    heartbeat: status (running, done, failed, interrupted), epoch, step, last
                    loss, timestamps, pid and host; rewritten every few seconds while running
- ``metrics.jsonl`` one JSON object per line; ``kind`` is ``step``, ``epoch`` or ``eval``, and
                    every record has ``epoch`` and ``global_step``
- ``summary.json``  final metrics (``knn_top1``, ``knn_top1_random``, ``knn_top1_pixels``,
                    ``linear_top1``, ``epochs_done``, ``wall_s``, ``imgs_per_s``, versions, commit)
- ``checkpoint.pt`` model, optimiser and memory state at a step boundary
- ``train.log``     the plain-text log
- ``lock.json``     who trains the run now (host, pid, heartbeat): see :mod:`cltool.lock`

Every file is written atomically (write a sibling temporary file, then rename), and
``metrics.jsonl`` is cut back to the checkpoint's step on resume, so that the folder always
describes one consistent point of the run. Readers are tolerant: a truncated last line or a
half-written file is skipped, not a crash. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

CONFIG = "config.toml"
STATE = "state.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
LOG = "train.log"

LOCK = "lock.json"

#: The states a run folder's ``state.json`` records; :mod:`cltool.runstate` turns a folder
#: into the state that every reader reports (adding lost, new, pending, ...).
RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so under a lock: threads write too)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets the mode any new file of the process gets (0666 less the umask), not
    ``mkstemp``'s 0600: on a cluster's shared file system the group reads the results.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, half-written or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, skipping lines a crash left half-written."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
    except OSError:
        return


@dataclass(frozen=True)
class RunDir:
    """Paths and small, atomic reads and writes of one run folder."""

    path: Path

    @classmethod
    def for_run(cls, out: Path, name: str, run_id: str) -> RunDir:
        return cls(Path(out) / name / run_id)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def state_file(self) -> Path:
        return self.path / STATE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    def state(self) -> dict[str, Any] | None:
        return read_json(self.state_file)

    def summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_file)

    def is_done(self) -> bool:
        state = self.state()
        return self.summary() is not None and state is not None and state.get("status") == DONE

    def write_state(self, status: str, **fields: Any) -> None:
        previous = self.state() or {}
        now = time.time()
        state = {
            **previous,
            **fields,
            "status": status,
            "updated_at": now,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        state.setdefault("started_at", now)
        atomic_write_json(self.state_file, state)

    def records(self) -> list[dict[str, Any]]:
        return list(iter_jsonl(self.metrics))

    def truncate_metrics(self, global_step: int) -> None:
        """Keep only records up to ``global_step``: what a resume from that checkpoint redoes."""
        if not self.metrics.exists():
            return
        kept = [r for r in iter_jsonl(self.metrics) if r.get("global_step", 0) <= global_step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))


def find_run_dirs(root: Path) -> list[RunDir]:
    """Every run folder (one holding a config.toml) at or below ``root``, sorted by path."""
    root = Path(root)
    if (root / CONFIG).is_file():
        return [RunDir(root)]
    return sorted((RunDir(p.parent) for p in root.rglob(CONFIG)), key=lambda r: r.path)


class MetricSink(Protocol):
    """Where a run's records go besides ``metrics.jsonl`` (W&B, for one)."""

    def log(self, record: dict[str, Any]) -> None:
        """One record, as appended to ``metrics.jsonl``."""

    def finish(self, summary: dict[str, Any] | None, status: str) -> None:
        """The run ended with ``status`` (done, failed, interrupted); summary when done."""
