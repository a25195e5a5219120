"""Checkpoint files of runs and stages: written whole or not at all, read back with one clear
error instead of a traceback.

A checkpoint is written into memory first and then replaced atomically, so a kill during the
write leaves the previous checkpoint (or none), never a truncated file that resume would trip on.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Protocol

import torch

from cltool.errors import CLToolError
from cltool.track import atomic_write_bytes


class Stateful(Protocol):
    """A module or an optimiser: what a checkpoint holds the state of."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Resumable:
    """Checkpoint and resume for a training loop whose counters (a dataclass with
    ``global_step`` and ``resumed_from_step``) live in ``self.state``: the run's trainer and a
    stage's share this, and name their file, the parts they save and what identifies them."""

    state: Any
    device: torch.device
    #: The counters' dataclass, rebuilt from a checkpoint.
    counters: type
    #: What to do about a checkpoint that cannot be read.
    unreadable_fix: str

    def checkpoint_file(self) -> Path:
        raise NotImplementedError

    def saved_parts(self) -> dict[str, Stateful]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Saved beside the parts, to tell which run or stage wrote the checkpoint."""
        return {}

    def write_training_checkpoint(self) -> None:
        blob = {name: part.state_dict() for name, part in self.saved_parts().items()}
        blob |= {"state": vars(self.state), **self.identity()}
        write_checkpoint(self.checkpoint_file(), blob)

    def load_checkpoint(self) -> bool:
        """Restore every part and the counters; False when there is no checkpoint to resume."""
        blob = read_checkpoint(self.checkpoint_file(), fix=self.unreadable_fix, device=self.device)
        if blob is None:
            return False
        for name, part in self.saved_parts().items():
            part.load_state_dict(blob[name])
        self.state = self.counters(**blob["state"])
        self.state.resumed_from_step = self.state.global_step
        return True


def write_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """Save ``blob`` (state dicts and counters) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(
    path: Path,
    *,
    fix: str,
    device: torch.device | str = "cpu",
    error: type[CLToolError] = CLToolError,
) -> dict[str, Any] | None:
    """The blob saved at ``path``, None when there is no file; a file that cannot be read raises
    ``error`` naming it and ``fix`` (what the user should do, e.g. rerun with --force)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # a checkpoint we cannot read is a user-level problem
        raise error(f"{path}: unreadable checkpoint ({err.__class__.__name__}); {fix}") from None
