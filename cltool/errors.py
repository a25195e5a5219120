"""The one exception type users see.

Every error a user can cause (a bad recipe, a missing file, no network for a download, a dead
SLURM controller) is raised as a :class:`CLToolError`; the CLI prints its message as one line and
exits with its code, never with a traceback.
"""

from __future__ import annotations


class CLToolError(Exception):
    """A user-facing error: one line that names the file, the key and the fix."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RecipeError(CLToolError):
    """The recipe (file or ``--set`` override) is malformed, unknown or out of range."""

    exit_code = 2
