"""The exceptions users see, and the exit codes every ``cl`` command ends with.

Every error a user can cause (a bad recipe, a missing file, no network for a download, a dead
SLURM controller) is raised as a :class:`CLToolError`; the CLI prints its message as one line and
exits with its code, never with a traceback. One rule for all commands, so that scripts and
schedulers can tell "fix your input" from "the run broke":

==== ===========================================================================================
code meaning
==== ===========================================================================================
0    ok
1    a run or job failed (also a W&B upload, an sbatch refusal)
2    bad input: usage, a recipe or override, an unknown flag value, a missing file or folder
3    ``cl status``: some run of the sweep failed
130  interrupted (Ctrl-C); 129 / 143 for SIGHUP / SIGTERM
==== ===========================================================================================
"""

from __future__ import annotations

#: Exit codes of the rule above, by name.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_SOME_RUN_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CLToolError(Exception):
    """A user-facing error: one line that names the file, the key and the fix."""

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(CLToolError):
    """What the user gave is wrong or missing: a flag value, a path, a data set's files.

    Exit code 2, so that a script can tell it from a run that started and failed (1)."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(InputError):
    """The recipe (file or ``--set`` override) is malformed, unknown or out of range."""
