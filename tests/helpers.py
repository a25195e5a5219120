"""Constants and small builders shared by the test modules."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import click.testing
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cltool.lock import HEARTBEAT_S, Holder
from cltool.track import RunDir, atomic_write_json


def invoke(*args: object, env: dict[str, str] | None = None) -> click.testing.Result:
    """``cl ARGS`` in this process (Typer's runner: stdout and stderr kept apart)."""
    from cltool.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def sets(overrides: list[str]) -> list[str]:
    """``--set`` flags for each override."""
    return [a for s in overrides for a in ("--set", s)]


ROOT = Path(__file__).resolve().parents[1]
MOCO = ROOT / "recipes" / "moco.toml"

#: Overrides that make a run a couple of seconds of real training on the embedded glyphs.
TINY = [
    "train.epochs=1",
    "train.batch_size=64",
    "data.num_train=256",
    "data.num_test=128",
    "model.width=8",
    "eval.every_epochs=0",
    "eval.linear=false",
    "eval.baselines=false",
]


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    """``rows`` random unit vectors of ``dim`` dimensions, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g), dim=1)


def start_cl(*args: str, cwd: Path, **kwargs: object) -> subprocess.Popen[str]:
    """``cl ARGS`` started in a subprocess (to signal, kill or race it), output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "cltool", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        **kwargs,
    )


def run_cl(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``cl ARGS`` in a subprocess, as a user runs it: no colour, wide lines, output captured;
    ``env`` adds to (or overrides) the environment."""
    return subprocess.run(
        [sys.executable, "-m", "cltool", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
    )


def hold(
    run_dir: RunDir, host: str, pid: int, heartbeat_age: float = 0.0, **fields: object
) -> Holder:
    """Write the lock a process ``pid`` on ``host`` would hold on ``run_dir``, its last
    heartbeat ``heartbeat_age`` seconds ago (as a process elsewhere leaves it)."""
    now = time.time()
    holder = Holder(
        token=f"test-{host}-{pid}",
        host=host,
        pid=pid,
        pid_start=None,
        slurm_job=None,
        slurm_restart=0,
        started_at=now - heartbeat_age - 60,
        heartbeat_at=now - heartbeat_age,
        interval_s=HEARTBEAT_S,
    )
    holder = dataclasses.replace(holder, **fields)
    atomic_write_json(run_dir.lock_file, dataclasses.asdict(holder))
    return holder
