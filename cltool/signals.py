"""Ctrl-C, SIGTERM and SIGHUP as a request to stop at the next step boundary, in one process
or many.

A run stopped mid-step would lose the step; a run stopped between steps keeps a checkpoint and
resumes exactly. So the first signal only raises a flag that the trainer polls (all ranks agree
on it through one all-reduce per step, so they stop at the same step); a second Ctrl-C aborts at
once. The process then exits with the shell's convention for the signal, 128 + its number
(130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). SIGHUP is what an SSH disconnect sends: the
terminal is gone, so output is detached from it first (the run's lines still reach
``train.log``). Under ``cl run --nproc N`` the terminal's Ctrl-C reaches the launcher and every
rank; a signal sent to the launcher alone (``kill -INT``) is passed on to the ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

#: The signals that ask a run to stop at the next step.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by signal ``signum``."""
    return 128 + signum


class StopFlag:
    """Truthy once a stop signal arrived (:attr:`signum` says which); the second SIGINT raises
    KeyboardInterrupt."""

    def __init__(self, announce: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.aborted = False
        self.announce = announce

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __call__(self) -> bool:
        return self.requested

    def handle(self, signum: int, frame: Any) -> None:
        if self.aborted:
            return  # already unwinding: a third signal must not interrupt the clean-up
        if signum == signal.SIGHUP:
            from cltool.display import detach_output

            detach_output()
        if self.requested and signum == signal.SIGINT:
            self.aborted = True
            raise KeyboardInterrupt
        if not self.requested:
            self.signum = signum
            # After a hang-up nobody reads the notice; and printing from a handler that may
            # have interrupted a print of the same process is what a handler should not do.
            if self.announce is not None and signum != signal.SIGHUP:
                self.announce(signum)

    def install(self) -> StopFlag:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)
        return self


class ForwardToRanks:
    """The launcher's handler: announce the stop once and pass it on to the rank processes.

    The first signal goes on as SIGTERM (a stop request that a rank which also got the
    terminal's SIGINT does not mistake for a second Ctrl-C), a second SIGINT as SIGINT (abort).
    """

    def __init__(self, pids: Iterable[int], announce: Callable[[int], None] | None = None) -> None:
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
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)
        return self
