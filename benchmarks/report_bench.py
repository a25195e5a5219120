"""Time ``cl report`` over 1,000 and 10,000 synthetic run folders (target: 1,000 under 2 s).

Each folder is what a finished run leaves: the resolved recipe as ``config.toml``, a
``state.json``, a ``summary.json`` and a 50-line ``metrics.jsonl``, for a 5 x 4 grid of
momentum and queue size over many seeds. Times the library in-process (load, group, JSON) and
the command as a user runs it (``python -m cltool report DIR --format json``, a fresh process,
so imports count).

    .venv/bin/python benchmarks/report_bench.py [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cltool import report
from cltool.recipe import resolve, to_toml

MOMENTA = (0.9, 0.99, 0.995, 0.999, 0.9999)
QUEUES = (1024, 4096, 16384, 65536)


def metrics_lines(rng: random.Random, epochs: int = 10) -> str:
    """50 records: four step records and one epoch record per epoch."""
    records = []
    for epoch in range(epochs):
        for step in range(4):
            step_id = epoch * 40 + step * 10 + 10
            loss = 8 - epoch * 0.3 + rng.random()
            records.append({"kind": "step", "epoch": epoch, "global_step": step_id, "loss": loss})
        records.append(
            {"kind": "epoch", "epoch": epoch, "global_step": epoch * 40 + 40, "loss": 7 - epoch}
        )
    return "".join(json.dumps(r) + "\n" for r in records)


def make_runs(out: Path, count: int) -> None:
    rng = random.Random(0)
    grid = [(m, k) for m in MOMENTA for k in QUEUES]
    for index in range(count):
        m, k = grid[index % len(grid)]
        recipe = resolve(
            {
                "name": "bench",
                "key_encoder": {"m": m},
                "dictionary": {"K": k},
                "train": {"seed": index // len(grid)},
            }
        )
        path = out / recipe.name / recipe.fingerprint
        path.mkdir(parents=True)
        (path / "config.toml").write_text(to_toml(recipe))
        (path / "state.json").write_text(json.dumps({"status": "done", "epoch": 10}))
        summary = {
            "knn_top1": 60 + 20 * m + rng.gauss(0, 1),
            "linear_top1": 65 + 20 * m + rng.gauss(0, 1),
            "epochs_done": 10,
            "wall_s": 100.0,
        }
        (path / "summary.json").write_text(json.dumps(summary))
        (path / "metrics.jsonl").write_text(metrics_lines(rng))


def time_in_process(out: Path) -> float:
    start = time.perf_counter()
    rep = report.build_report(report.load_runs(out))
    report.to_json(rep)
    return time.perf_counter() - start


def time_command(out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cltool", "report", str(out), "--format", "json"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "runs"
            start = time.perf_counter()
            make_runs(out, size)
            made = time.perf_counter() - start
            in_process = time_in_process(out)
            command = time_command(out)
            print(
                f"{size:>6} runs: in-process {in_process:.2f} s, `cl report --format json` "
                f"{command:.2f} s (generating them took {made:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
