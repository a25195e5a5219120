"""Ctrl-C and SIGTERM as a request to stop at the next step boundary, in one process or many.

A run stopped mid-step would lose the step; a run stopped between steps keeps a checkpoint and
resumes exactly. So the first signal only raises a flag that the trainer polls (all ranks agree
on it through one all-reduce per step, so they stop at the same step); a second Ctrl-C aborts at
once. Under ``cl run --nproc N`` the terminal's Ctrl-C reaches the launcher and every rank; a
signal sent to the launcher alone (``kill -INT``) is passed on to the ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any


class StopFlag:
    """Truthy once a SIGINT or SIGTERM arrived; the second SIGINT raises KeyboardInterrupt."""

    def __init__(self, announce: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.aborted = False
        self.announce = announce

    def __call__(self) -> bool:
        return self.requested

    def handle(self, signum: int, frame: Any) -> None:
        if self.aborted:
            return  # already unwinding: a third signal must not interrupt the clean-up
        if self.requested and signum == signal.SIGINT:
            self.aborted = True
            raise KeyboardInterrupt
        if not self.requested and self.announce is not None:
            self.announce()
        self.requested = True

    def install(self) -> StopFlag:
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)
        return self


class ForwardToRanks:
    """The launcher's handler: announce the stop once and pass it on to the rank processes.

    The first signal goes on as SIGTERM (a stop request that a rank which also got the
    terminal's SIGINT does not mistake for a second Ctrl-C), a second SIGINT as SIGINT (abort).
    """

    def __init__(self, pids: Iterable[int], announce: Callable[[], None] | None = None) -> None:
        self.pids = list(pids)
        self.flag = StopFlag(announce)

    def handle(self, signum: int, frame: Any) -> None:
        try:
            self.flag.handle(signum, frame)
            forwarded = signal.SIGTERM
        except KeyboardInterrupt:
            forwarded = signal.SIGINT
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):  # that rank has already ended
                os.kill(pid, forwarded)

    def install(self) -> ForwardToRanks:
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)
        return self
