"""A TPE search with pruning against the grid that the same compute buys (issue 15).

For each repetition (a training seed), it runs, as a user would, with the real ``cl``:

1. ``cl sweep RECIPE --search tpe --trials N`` over lr (log range), T (range) and m (choices),
   pruning on the kNN monitor (``eval.every_epochs``);
2. a grid over the same three keys with as many runs as the search's compute buys, compute being
   epochs trained summed over runs (a pruned trial counts the epochs it trained; a trial that
   reused another's run counts nothing);

and prints, per repetition and method: runs, compute, best kNN top-1, share of trials pruned,
wall time, and the commands. Each repetition's search and grid use the same ``train.seed`` and
separate output folders, so nothing is shared between them.

    .venv/bin/python benchmarks/search_vs_grid.py                       # the embedded default
    .venv/bin/python benchmarks/search_vs_grid.py --trials 8 --every 2 \\
        --set train.epochs=8 --set data.num_train=1000                   # a shorter version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LR = (0.01, 0.3)
T = (0.05, 0.5)
M = (0.9, 0.99, 0.999)


def cl(*args: str, threads: int) -> float:
    """Run ``cl ARGS`` (failing loudly); its wall time in seconds."""
    print("$ cl " + " ".join(args), flush=True)
    started = time.monotonic()
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "cltool", *args], check=True, env=env, cwd=ROOT)
    return time.monotonic() - started


def epochs_trained(run_dir: Path) -> float:
    """Epochs a run trained, from its state: done runs all, pruned ones up to their stop."""
    state = json.loads((run_dir / "state.json").read_text())
    return state["global_step"] * state["epochs"] / state["total_steps"]


def sweep_folder(out: Path) -> Path:
    (folder,) = (out / "sweeps").iterdir()
    return folder


def runs_of(folder: Path) -> list[Path]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder.parent.parent / r["run_dir"] for r in manifest["runs"]]


def grid_counts(points: int) -> dict[str, int]:
    """Values per key (lr, T, m; m has three choices) for the largest grid of at most
    ``points`` runs, the most even one among equals (then more lr values, then T); at least
    one point."""
    shapes = [
        (lr, t, m)
        for lr in range(1, points + 1)
        for t in range(1, points + 1)
        for m in range(1, len(M) + 1)
        if lr * t * m <= max(points, 1)
    ]
    lr, t, m = max(shapes, key=lambda s: (math.prod(s), min(s) - max(s), s))  # lr, T first
    return {"lr": lr, "T": t, "m": m}


def spaced(low: float, high: float, count: int, log: bool) -> list[float]:
    """``count`` values at the centres of equal cells of the range (in log space for ``log``):
    where a grid of that size puts its points, ends left out (a 2-point grid of the ends would
    test only the extremes)."""
    if log:
        low, high = math.log(low), math.log(high)
    points = [low + (i + 0.5) * (high - low) / count for i in range(count)]
    return [round(math.exp(p) if log else p, 6) for p in points]


def grid_values(counts: dict[str, int]) -> dict[str, list[float]]:
    m = {1: [M[1]], 2: [M[0], M[-1]], 3: list(M)}[counts["m"]]
    return {"lr": spaced(*LR, counts["lr"], True), "T": spaced(*T, counts["T"], False), "m": m}


def repetition(args: argparse.Namespace, rep: int, out: Path) -> list[dict[str, Any]]:
    sets = [a for s in [f"train.seed={rep}", *args.set] for a in ("--set", s)]
    sets += ["--set", f"eval.every_epochs={args.every}", "--set", "eval.linear=false"]
    search_out = out / f"search-{rep}"
    search_wall = cl(
        "sweep", args.recipe, "--search", "tpe", "--trials", str(args.trials),
        "--param", f"lr={LR[0]}..{LR[1]}:log", "--param", f"T={T[0]}..{T[1]}",
        "--param", "m=" + ",".join(map(str, M)), "--pruner", args.pruner,
        "--jobs", str(args.jobs), *sets, "--out", str(search_out), threads=args.threads,
    )  # fmt: skip
    folder = sweep_folder(search_out)
    status = [sys.executable, "-m", "cltool", "status", str(folder), "--format", "json"]
    shown = subprocess.run(status, capture_output=True, text=True, cwd=ROOT)
    trials = json.loads(shown.stdout)["trials"]
    complete = [t["value"] for t in trials if t["state"] == "complete"]
    search_compute = sum(epochs_trained(r) for r in runs_of(folder))
    epochs = json.loads((runs_of(folder)[0] / "state.json").read_text())["epochs"]

    counts = grid_counts(max(1, int(search_compute // epochs)))
    values = grid_values(counts)
    grid_out = out / f"grid-{rep}"
    grid_wall = cl(
        "sweep", args.recipe, *(a for k, v in values.items()
                                for a in ("--param", f"{k}=" + ",".join(map(str, v)))),
        "--jobs", str(args.jobs), *sets, "--out", str(grid_out), threads=args.threads,
    )  # fmt: skip
    grid_runs = runs_of(sweep_folder(grid_out))
    grid_best = max(json.loads((r / "summary.json").read_text())["knn_top1"] for r in grid_runs)
    return [
        {
            "rep": rep,
            "method": f"TPE + {args.pruner}",
            "runs": len(trials),
            "compute_epochs": round(search_compute, 2),
            "best_knn": max(complete) if complete else None,
            "pruned_share": sum(t["state"] == "pruned" for t in trials) / len(trials),
            "wall_s": round(search_wall, 1),
        },
        {
            "rep": rep,
            "method": "grid " + " x ".join(f"{k} {n}" for k, n in counts.items()),
            "runs": len(grid_runs),
            "compute_epochs": round(sum(epochs_trained(r) for r in grid_runs), 2),
            "best_knn": grid_best,
            "pruned_share": 0.0,
            "wall_s": round(grid_wall, 1),
        },
    ]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rep | method | runs | compute (epochs) | best kNN top-1 | pruned | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = "–" if r["best_knn"] is None else f"{r['best_knn']:.1f}"
        lines.append(
            f"| {r['rep']} | {r['method']} | {r['runs']} | {r['compute_epochs']:g} | {best} | "
            f"{r['pruned_share']:.0%} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/moco.toml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--every", type=int, default=5, help="eval.every_epochs (the monitor)")
    parser.add_argument("--pruner", default="hyperband", choices=("halving", "hyperband"))
    parser.add_argument("--jobs", type=int, default=1, help="local workers (search and grid)")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="search_vs_grid-"))
    rows = [row for rep in range(args.reps) for row in repetition(args, rep, out)]
    load = os.getloadavg()[0]
    print(f"\n{args.recipe} {' '.join(args.set)}, {args.trials} trials, load {load:.1f}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "rows": rows},
                                        indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
