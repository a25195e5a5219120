"""The size and place of a SLURM job: one definition for the ``[slurm]`` table of a recipe, the
SLURM flags of ``cl run`` and ``cl sweep``, and the rows ``cl keys`` shows for them.

Each field's metadata holds its description and, for counts, the least value allowed; the flags'
help texts, the table's validation and ``cl keys`` all read it from here. Imports neither torch
nor submitit, so the command line can build its flags from it at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from cltool.errors import RecipeError

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
DEFAULT_TIME = "1:00:00"


def parse_time(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    match = _TIME.match(text.strip())
    if match is None:
        raise RecipeError(f"slurm time '{text}': use minutes, H:MM:SS or D-HH:MM:SS")
    d, a, b, c = (int(x) if x is not None else None for x in match.group("d", "a", "b", "c"))
    if d is not None:  # D-H[:M[:S]]
        seconds = ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise RecipeError(f"slurm time '{text}' must be positive")
    return -(-seconds // 60)


def _option(doc: str, least: int | None = None, default: Any = None) -> Any:
    """A SlurmOptions field: its description and, for a count, the least value allowed."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"doc": doc, "least": least})
    return field(default=default, metadata={"doc": doc, "least": least})


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how big each job or array task is. Flags override the file's ``[slurm]`` table;
    ``None`` leaves the cluster's default."""

    partition: str | None = _option("SLURM partition")
    gpus_per_node: int | None = _option(
        "GPUs per node; a run given several trains one rank per GPU", least=0
    )
    cpus_per_task: int | None = _option("CPUs per task (default: the cluster's, often 1)", 1)
    mem_gb: float | None = _option("memory per task, GB (default: the cluster's)")
    time: str | None = _option(
        f"time limit of each job: minutes, H:MM:SS or D-HH:MM:SS (default {DEFAULT_TIME})"
    )
    account: str | None = _option("SLURM account")
    qos: str | None = _option("SLURM QoS")
    constraint: str | None = _option("SLURM node constraint")
    array_parallelism: int | None = _option(
        "cl sweep: at most this many array tasks at once (%N throttle)", least=1
    )
    sbatch: dict[str, str] = _option(
        'extra sbatch options, a table: { exclude = "node3" }', default={}
    )
    nodes: int | None = _option("cl run: nodes of the run", least=1)
    ntasks_per_node: int | None = _option(
        "cl run: ranks per node (default: one per GPU, else --nproc)", least=1
    )

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str) -> SlurmOptions:
        """Validate a ``[slurm]`` table: same names as the flags, ``sbatch`` a table of extras."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise RecipeError(f"{where}: unknown [slurm] key '{key}': use {', '.join(known)}")
            least = known[key].metadata["least"]
            if key == "sbatch":
                if not isinstance(value, dict):
                    raise RecipeError(f"{where}: slurm.sbatch must be a table of sbatch options")
                value = {str(k): str(v) for k, v in value.items()}
            elif least is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise RecipeError(
                        f"{where}: slurm.{key} = {value!r}: need a whole number >= {least}"
                    )
            elif key == "mem_gb":
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise RecipeError(
                        f"{where}: slurm.mem_gb = {value!r} must be a positive number"
                    )
            elif not isinstance(value, str):
                raise RecipeError(f"{where}: slurm.{key} = {value!r} must be a string")
            values[key] = value
        options = cls(**values)
        if options.time is not None:
            parse_time(options.time)
        return options

    def overridden_by(self, flags: SlurmOptions) -> SlurmOptions:
        changes = {
            f.name: getattr(flags, f.name)
            for f in fields(flags)
            if getattr(flags, f.name) not in (None, {})
        }
        if "sbatch" in changes:
            changes["sbatch"] = {**self.sbatch, **changes["sbatch"]}
        return replace(self, **changes)

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        """Parameters for ``SlurmExecutor.update_parameters`` (submitit's sbatch names).

        Memory goes through ``additional_parameters`` so the same dict renders the dry-run script.
        """
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": parse_time(self.time or DEFAULT_TIME),
        }
        tasks = self.ntasks_per_node or (self.gpus_per_node or 0)
        if tasks > 1:  # a distributed run: each task is a rank, submitit exports its env
            params["ntasks_per_node"] = tasks
        for name in (
            "partition",
            "nodes",
            "gpus_per_node",
            "cpus_per_task",
            "account",
            "qos",
            "constraint",
            "array_parallelism",
        ):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        extra = dict(self.sbatch)
        if self.mem_gb is not None:
            extra.setdefault("mem", f"{round(self.mem_gb * 1024)}M")
        if extra:
            params["additional_parameters"] = extra
        return params

    def defaults_note(self) -> str | None:
        """One line on the sizes left to the cluster's defaults, which are often 1 CPU and a
        small share of memory: a run then trains far slower than on a workstation, or is killed.
        None when both are set."""
        left_out = [
            flag
            for flag, value in (
                ("--cpus-per-task", self.cpus_per_task),
                ("--mem-gb", self.mem_gb or self.sbatch.get("mem")),
            )
            if value is None
        ]
        if not left_out:
            return None
        return (
            f"note: no {' / '.join(left_out)} given: the cluster's defaults apply (often 1 CPU "
            "and little memory); set them as flags or in the recipe's [slurm] table"
        )


def describe_slurm_keys() -> list[tuple[str, str, str]]:
    """(``slurm.<key>``, default, description) for ``cl keys``."""
    return [
        (f"slurm.{f.name}", "{}" if f.name == "sbatch" else "-", f.metadata["doc"])
        for f in fields(SlurmOptions)
    ]


def doc(name: str) -> str:
    """The description of one field, as a flag's help text."""
    text = next(f.metadata["doc"] for f in fields(SlurmOptions) if f.name == name)
    return text[0].upper() + text[1:] + "."
