"""What the ``cl`` commands share: one-line errors, the executor choice, the stop notice, and the
SLURM flags of ``cl run`` and ``cl sweep``.

The SLURM flags are defined once, in :data:`SLURM_FLAGS`, and :func:`slurm_flags` adds them
(and ``--dry-run``) to a command's signature, so the two commands cannot drift apart: a flag or a
help text changed here changes in both. Nothing here imports torch or the launch machinery; the
flags become a :class:`cltool.slurm_options.SlurmOptions`, the same fields as a recipe's
``[slurm]`` table.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cltool import slurm_options
from cltool.display import RunConsole
from cltool.errors import CLToolError, InputError

error_console = RunConsole(stderr=True)

EXECUTORS = ("local", "slurm")
SLURM_PANEL = "SLURM (with --executor slurm)"

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A CLToolError becomes ``error: <message>`` on stderr and its exit code, no traceback.

    A context manager that also decorates a command (``@one_line_errors()``). The message is
    escaped: recipe errors quote ``[slurm]`` or ``[sweep]``, which rich would take for markup.
    """
    try:
        yield
    except CLToolError as err:
        error_console.print(
            f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(err.exit_code) from None


def choose(value: str, allowed: tuple[str, ...], flag: str) -> str:
    """``value`` when it is one of ``allowed``; else the one-line error naming the flag."""
    if value not in allowed:
        raise InputError(f"{flag} {value}: choose one of {', '.join(allowed)}")
    return value


def stop_notice(signum: int) -> str:
    """What the first stop signal prints: which signal, and for Ctrl-C how to abort at once."""
    again = " (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""
    return f"{signal.Signals(signum).name}: stopping after this step{again}"


def stop_announcer(console: Console) -> Callable[[int], None]:
    """The first stop signal's notice, printed through ``console``.

    It must be the console that draws the live progress bar or spinner: rich then prints the
    notice on a line of its own above the live display, where a write to another stream would
    land inside the bar's line. Without a terminal it goes to stderr, as errors do.
    """

    def announce(signum: int) -> None:
        target = console if console.is_terminal else error_console
        target.print(stop_notice(signum), highlight=False)

    return announce


def print_job_script(
    console: Console, script: str, what: str, options: slurm_options.SlurmOptions
) -> None:
    """A dry run's job script, printed raw (rich would take its ``[...]`` for markup), then the
    note on the sizes left to the cluster's defaults."""
    console.print(f"# job script (slurm, {what}):", highlight=False)
    print(script)
    note = options.defaults_note()
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)


def _slurm_flag(name: str, annotation: Any, **limits: Any) -> Any:
    """The option of one SlurmOptions field, its help the field's description."""
    option = typer.Option(help=slurm_options.doc(name), rich_help_panel=SLURM_PANEL, **limits)
    return Annotated[annotation, option]


#: Parameter name (= SlurmOptions field, = ``[slurm]`` key) -> its option; every default is None,
#: which leaves the recipe's ``[slurm]`` value, or the cluster's default, in place.
SLURM_FLAGS: dict[str, Any] = {
    "partition": _slurm_flag("partition", str | None),
    "time": _slurm_flag("time", str | None),
    "account": _slurm_flag("account", str | None),
    "qos": _slurm_flag("qos", str | None),
    "constraint": _slurm_flag("constraint", str | None),
    "gpus_per_node": _slurm_flag("gpus_per_node", int | None, min=0),
    "cpus_per_task": _slurm_flag("cpus_per_task", int | None, min=1),
    "mem_gb": _slurm_flag("mem_gb", float | None, min=0),
    "sbatch": Annotated[
        list[str] | None,
        typer.Option(
            help="Extra sbatch option `KEY=VALUE` (e.g. `exclude=node3`). Repeatable.",
            rich_help_panel=SLURM_PANEL,
        ),
    ],
}
DRY_RUN = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Show what would run (with --executor slurm: the job script and which task runs "
        "what); run, submit and write nothing.",
    ),
]


def split_sbatch(text: str) -> tuple[str, str]:
    """``--sbatch KEY=VALUE`` as a pair, or the one-line error showing the form."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--sbatch {text!r}: expected KEY=VALUE, e.g. --sbatch exclude=node3")
    return key.strip(), value.strip()


def slurm_flags(command: F) -> F:
    """Add the SLURM flags and ``--dry-run`` to a Typer command.

    ``command`` declares ``slurm`` (it receives a :class:`~cltool.slurm_options.SlurmOptions` of
    the flags given, to lay over the recipe's ``[slurm]`` table) and ``dry_run``; the flags
    themselves are not in its signature. Typer reads the rewritten signature, so ``--help``
    lists them.
    """
    signature = inspect.signature(command)
    kept = [p for p in signature.parameters.values() if p.name not in ("slurm", "dry_run")]
    resolved = {p.name: _evaluated(p.annotation, command) for p in kept}
    added = {**SLURM_FLAGS, "dry_run": DRY_RUN}
    parameters = [p.replace(annotation=resolved[p.name]) for p in kept] + [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=False if name == "dry_run" else None,
            annotation=annotation,
        )
        for name, annotation in added.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name) for name in SLURM_FLAGS}
        extra = dict(split_sbatch(item) for item in flags.pop("sbatch") or [])
        return command(**kwargs, slurm=slurm_options.SlurmOptions(**flags, sbatch=extra))

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**resolved, **added}
    return wrapper  # type: ignore[return-value]


def _evaluated(annotation: Any, command: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) as the object it names."""
    if isinstance(annotation, str):
        return eval(annotation, command.__globals__)  # the module's own annotation
    return annotation
