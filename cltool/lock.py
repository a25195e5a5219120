"""One owner per run: a lock file in the run folder that names its holder and keeps proving it
alive.

The process that trains a run holds ``<run>/lock.json``: host, pid (with the process's start
time, so a reused pid is not mistaken for the holder), SLURM job and restart count, and a
heartbeat rewritten every :data:`HEARTBEAT_S` seconds by a background thread. Anyone may judge
a holder from the file alone:

- on the holder's own host, a holder whose process is gone is dead (provably);
- anywhere, a holder whose heartbeat is older than :data:`STALE_INTERVALS` intervals is stale
  (its host died, or the file system lost it);
- a holder from an earlier start of the same SLURM job (a requeue after preemption: the job
  id stays, ``SLURM_RESTART_COUNT`` grows) is over, since SLURM runs a job once at a time.

A dead, stale or requeued holder is taken over with a line saying so; a live one is respected.

Why a file and not ``flock``: advisory locks are unreliable on the NFS-like shared file systems
of SLURM clusters (lockd, Lustre without ``-o flock``), while creating a file with ``link(2)``
is atomic and exclusive on every one of them, local disks included. The lock is first written
to a private temporary file and then linked into place, so it is never seen half-written; an
NFS ``link`` whose reply was lost is checked by the temporary file's link count, the classic
NFS-safe recipe. A taker first moves the old lock aside with ``rename(2)`` (atomic), and puts it
back if what it moved is not the holder it judged (another taker was faster).

Clocks: heartbeat ages compare the holder's clock with the reader's, which on a cluster are
NTP-synchronised to well under the two-minute staleness bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cltool.errors import CLToolError
from cltool.track import LOCK, atomic_write_json

#: Seconds between heartbeats of a holder.
HEARTBEAT_S = 10.0
#: A heartbeat older than this many intervals marks its holder stale (2 minutes by default).
STALE_INTERVALS = 12
#: How often acquiring re-judges a lock that keeps changing under it before giving up.
ATTEMPTS = 5


class RunHeld(CLToolError):
    """Another live process holds the run."""

    exit_code = 2

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


class LockLost(CLToolError):
    """This process's lock was taken over (it stopped heartbeating for minutes): it must stop
    without writing anything more into the run folder, which now belongs to someone else."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere or
    when there is no such process: with the pid, it names one process for the boot's life."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of proc(5), counted after the name


def process_alive(pid: int, start: str | None) -> bool:
    """Whether the process ``pid`` started at ``start`` (from :func:`process_start`) lives on
    this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return start is None or process_start(pid) in (start, None)


def slurm_job() -> tuple[str | None, int]:
    """This process's SLURM job (``ARRAY_TASK`` for array tasks) and its restart count."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID") or None
    return job, int(env.get("SLURM_RESTART_COUNT") or 0)


@dataclass(frozen=True)
class Holder:
    """Who holds a run, as written in its lock file."""

    token: str
    host: str
    pid: int
    pid_start: str | None
    slurm_job: str | None
    slurm_restart: int
    started_at: float
    heartbeat_at: float
    interval_s: float

    @classmethod
    def this_process(cls, interval_s: float) -> Holder:
        pid, now = os.getpid(), time.time()
        job, restart = slurm_job()
        return cls(
            uuid.uuid4().hex,
            socket.gethostname(),
            pid,
            process_start(pid),
            job,
            restart,
            now,
            now,
            interval_s,
        )

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Holder | None:
        try:
            return cls(
                token=str(value["token"]),
                host=str(value["host"]),
                pid=int(value["pid"]),
                pid_start=value.get("pid_start"),
                slurm_job=value.get("slurm_job"),
                slurm_restart=int(value.get("slurm_restart") or 0),
                started_at=float(value["started_at"]),
                heartbeat_at=float(value["heartbeat_at"]),
                interval_s=float(value["interval_s"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def heartbeat_age(self, now: float) -> float:
        return max(0.0, now - self.heartbeat_at)

    def describe(self, now: float | None = None) -> str:
        age = self.heartbeat_age(time.time() if now is None else now)
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job} (heartbeat {age:.0f} s ago)"

    def gone(self, now: float | None = None) -> str | None:
        """Why this holder no longer trains the run (dead, stale, requeued), or None when it
        may still be training it."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and not process_alive(self.pid, self.pid_start):
            return f"pid {self.pid} on {self.host} is gone"
        age = self.heartbeat_age(now)
        if age > STALE_INTERVALS * self.interval_s:
            return f"pid {self.pid} on {self.host} has not heartbeaten for {age:.0f} s"
        job, restart = slurm_job()
        if job is not None and job == self.slurm_job and restart > self.slurm_restart:
            return f"it is an earlier start of this SLURM job {job}, now requeued"
        return None


def read_holder(path: Path) -> Holder | None:
    """The holder named by lock file ``path``; None when there is none (or it is unreadable)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Holder.from_json(value) if isinstance(value, dict) else None


def held_message(run_id: str, holder: Holder) -> str:
    return (
        f"run {run_id} is being trained by {holder.describe()}; this process does not train "
        "it: wait for it, or see `cl status`"
    )


def _write_private(folder: Path, holder: Holder) -> Path:
    """``holder`` in a new temporary file of ``folder`` (created with the process's umask)."""
    tmp = folder / f".{LOCK}.{holder.token}.{time.monotonic_ns()}"
    atomic_write_json(tmp, asdict(holder))
    return tmp


def _link_exclusive(tmp: Path, path: Path) -> bool:
    """Link ``tmp`` to ``path`` unless ``path`` exists; True when this process created it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # NFS: the link may have been made though its reply was lost
        return os.stat(tmp).st_nlink == 2
    return True


class RunLock:
    """The lock of one run folder, held by this process between :meth:`acquire` and
    :meth:`release` (or as a context manager), with a heartbeat thread while held."""

    def __init__(
        self,
        folder: Path,
        interval_s: float = HEARTBEAT_S,
        echo: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.interval_s = interval_s
        self.echo = echo
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the run, or raise :class:`RunHeld` naming the live holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = Holder.this_process(self.interval_s)
        tmp = _write_private(self.folder, mine)
        try:
            for _ in range(ATTEMPTS):
                if _link_exclusive(tmp, self.path):
                    self.holder = mine
                    self._start_heartbeat()
                    return self
                self._take_over_if_gone()
        finally:
            tmp.unlink(missing_ok=True)
        raise CLToolError(f"{self.path}: the lock kept changing while taking it; try again")

    def _take_over_if_gone(self) -> None:
        """Move a dead, stale or requeued holder's lock aside; raise RunHeld for a live one."""
        holder = read_holder(self.path)
        if holder is None:
            if self._unreadable_for_long():
                self._move_aside(None, "its lock file is unreadable")
            return
        why = holder.gone()
        if why is None:
            raise RunHeld(held_message(self.folder.name, holder), holder)
        self._move_aside(holder, why)

    def _unreadable_for_long(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > STALE_INTERVALS * self.interval_s

    def _move_aside(self, judged: Holder | None, why: str) -> None:
        aside = self.folder / f".{LOCK}.taken.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # its holder released it, or another taker moved it: judge again
        moved = read_holder(aside)
        if judged is not None and (moved is None or moved.token != judged.token):
            # Another process took the run over between our read and our move: give it back.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            self.echo(f"taking over run {self.folder.name}: {why}")
        aside.unlink(missing_ok=True)

    # -- holding -------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cltool-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.heartbeat():
                return

    def heartbeat(self) -> bool:
        """Rewrite the lock with a fresh heartbeat; False (and :attr:`lost` set) when the lock
        is no longer this process's."""
        assert self.holder is not None
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            taker = current.describe() if current else "nobody (the lock file is gone)"
            self.lost = f"run {self.folder.name} was taken over by {taker}"
            return False
        atomic_write_json(self.path, {**asdict(self.holder), "heartbeat_at": time.time()})
        return True

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` when the heartbeat found the run taken over."""
        if self.lost is not None:
            raise LockLost(f"{self.lost}: this process stops without writing to it")

    def release(self) -> None:
        """Stop heartbeating and remove the lock, if it is still this process's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        current = read_holder(self.path)
        if self.holder is not None and current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
