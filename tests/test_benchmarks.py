"""Smoke tests of the benchmark scripts: each runs end to end at the tiniest setting.

They check that the scripts still run against the current code (the benchmarks reach into the
trainer and the methods, which change) and print their ratio tables, not any timing.
"""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import ROOT

RATIO = re.compile(r"\d+\.\d+x")
TINY_THREADS = ["--threads", "1"]


def run_script(name: str, *args: str) -> str:
    """Run ``benchmarks/<name>`` and return its stdout; fail with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args, *TINY_THREADS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_step_bench_prints_ratios_to_the_floor() -> None:
    out = run_script(
        "step_bench.py",
        *("--backbone", "small_cnn", "--batch", "8", "--repeats", "1"),
        *("--num-train", "64", "--methods", "moco", "--no-lightly"),
    )
    assert "step / floor" in out
    assert RATIO.search(out), out
    assert "momentum update" in out


def test_step_bench_times_a_pass_per_view_with_set() -> None:
    """``--set`` reaches the recipes: separate view passes give SimCLR a floor of two passes."""
    out = run_script(
        "step_bench.py",
        *("--backbone", "small_cnn", "--batch", "8", "--repeats", "1"),
        *("--num-train", "64", "--methods", "simclr", "--no-lightly"),
        *("--set", 'model.encode_views="separate"'),
    )
    assert "encoder:8+ encoder:8+" in out, out


def test_throughput_prints_images_per_second_of_each_variant() -> None:
    out = run_script(
        "throughput.py",
        *("--device", "cpu", "--backbone", "small_cnn", "--batch", "8", "--num-train", "64"),
        *("--recipes", "moco", "--variants", "fp32", "bf16_cl"),
        *("--warmup", "1", "--steps", "1", "--repeats", "1"),
    )
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| moco |")]
    assert [row[1] for row in rows] == ["fp32", "bf16_cl"], out
    assert rows[0][3] == "1.00x" and RATIO.fullmatch(rows[1][3]), out
    assert all(float(row[2].replace(",", "")) > 0 for row in rows), out


def test_data_bench_prints_augmentation_ratios() -> None:
    out = run_script("data_bench.py", "--batch", "8", "--backbone", "small_cnn", "--repeats", "1")
    assert "torchvision / project" in out
    assert RATIO.search(out), out


def test_scale_bench_shows_no_queue_copies() -> None:
    out = run_script(
        "scale_bench.py",
        *("--ks", "256", "1024", "--batches", "8", "16", "--sizes", "256", "1024"),
        *("--repeats", "1", "--device", "cpu"),
    )
    assert "per_unit_vs_largest" in out
    copies = out.split("### no copies")[1]
    assert "| True |" not in copies, copies


def test_search_vs_grid_prints_both_methods_with_their_compute(tmp_path) -> None:
    tiny = ["train.epochs=2", "data.num_train=128", "data.num_test=128", "model.width=8",
            "train.batch_size=64", "eval.baselines=false"]  # fmt: skip
    out = run_script(
        "search_vs_grid.py", "--trials", "2", "--reps", "1", "--every", "1",
        *(a for s in tiny for a in ("--set", s)), "--out", str(tmp_path),
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| 0 |")]
    assert len(rows) == 2 and "TPE + hyperband" in rows[0] and "grid" in rows[1], out
