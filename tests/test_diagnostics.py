"""Diagnostics on real MoCo runs: consistency separates the momenta, own keys can be excluded."""

from __future__ import annotations

from pathlib import Path

from cltool.recipe import load_recipe
from cltool.run import run_recipe

MOCO = Path(__file__).resolve().parents[1] / "recipes" / "moco.toml"

#: K = 512 of 64-image batches: the queue holds 8 steps; 256 images: every image is in it twice.
TINY = [
    "epochs=2",
    "batch_size=64",
    "data.num_train=256",
    "data.num_test=64",
    "K=512",
    "model.width=8",
    "eval.every_epochs=0",
    "eval.linear=false",
    "eval.baselines=false",
    "eval.diagnostics_every_epochs=1",
]


def last_diag(overrides: list[str], out: Path) -> dict:
    outcome = run_recipe(load_recipe(MOCO, [*TINY, *overrides]), out, quiet=True)
    return [r for r in outcome.run_dir.records() if r["kind"] == "diag"][-1]


def test_consistency_is_lower_without_momentum(tmp_path: Path) -> None:
    fast = last_diag(["m=0.0"], tmp_path)
    slow = last_diag(["m=0.999"], tmp_path)
    assert slow["consistency_oldest"] > 0.99
    assert fast["consistency_oldest"] < slow["consistency_oldest"] - 0.02


def test_excluded_own_keys_are_never_among_the_hardest_negatives(tmp_path: Path) -> None:
    kept = last_diag([], tmp_path)
    excluded = last_diag(["dictionary.exclude_own_keys=true"], tmp_path)
    assert kept["own_key_share"] > 0
    assert excluded["own_key_share"] == 0


def test_diagnostics_do_not_change_training(tmp_path: Path) -> None:
    on = run_recipe(load_recipe(MOCO, TINY), tmp_path / "on", quiet=True)
    off = run_recipe(
        load_recipe(MOCO, [*TINY, "eval.diagnostics_every_epochs=0"]), tmp_path / "off", quiet=True
    )
    assert on.summary["knn_top1"] == off.summary["knn_top1"]
