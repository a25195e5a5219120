"""Every method's recipe, end to end on the embedded glyphs: it runs, reports MoCo's summary
fields, learns, and its memory state resumes exactly; plus the parts that are new here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cltool.errors import RecipeError
from cltool.methods.spcl import cluster_overlap, reliable_clusters
from cltool.recipe import SpclConfig, load_recipe
from cltool.run import Interrupted, run_recipe
from cltool.track import DONE

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NAMES = [
    "simclr",
    "simclr_v2",
    "supcon",
    "mocov3",
    "instdisc",
    "mochi",
    "xbm",
    "circle",
    "spcl",
    "moco_v1",
]

#: A few seconds per run: crosses epochs and memory warm-ups, no learning asked of it.
TINY = [
    "epochs=2",
    "batch_size=64",
    "data.num_train=256",
    "data.num_test=128",
    "model.width=8",
    "eval.every_epochs=0",
    "eval.linear_epochs=20",
    "train.log_every_steps=1",
    "dictionary.warmup_steps=4",  # XBM: the memory joins within the run
    "spcl.source_labelled=64",
    "mixing.start_epoch=1",
]

SUMMARY_FIELDS = (
    "knn_top1",
    "knn_top1_random",
    "knn_top1_pixels",
    "linear_top1",
    "epochs_done",
    "global_step",
    "wall_s",
    "imgs_per_s",
    "resumed_from_step",
    "device",
    "num_train",
    "num_test",
    "versions",
    "git_commit",
)


def run(name: str, overrides: list[str], out: Path, **kwargs):
    return run_recipe(load_recipe(RECIPES / f"{name}.toml", overrides), out, quiet=True, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_and_reports_moco_fields(name: str, tmp_path: Path) -> None:
    outcome = run(name, TINY, tmp_path)
    assert outcome.status == DONE and outcome.summary is not None
    for key in SUMMARY_FIELDS:
        assert key in outcome.summary, key
    assert outcome.summary["method"] == load_recipe(RECIPES / f"{name}.toml").method
    steps = [r for r in outcome.run_dir.records() if r["kind"] == "step"]
    assert all(np.isfinite(r["loss"]) for r in steps)


#: Long enough for every method to learn: 2000 images, 15 epochs of 64-image steps (5-20 s).
LEARN = [
    "epochs=15",
    "batch_size=64",
    "data.num_train=2000",
    "data.num_test=500",
    "model.width=16",
    "eval.every_epochs=0",
    "eval.linear=false",
    "dictionary.warmup_steps=30",
    "spcl.source_labelled=200",
    # On 2,000 images the recipe's DBSCAN radius 0.6 chains the memory into a few clusters and
    # SpCL collapses: +2.0 to +7.0 kNN points over the random encoder across seeds 0-2, data
    # seed 1 and one thread; with 0.5 it learns, +18.6 to +20.2 (seeds 0-2, one thread).
    "spcl.eps=0.5",
]


@pytest.mark.parametrize("name", NAMES)
def test_trained_encoder_beats_the_random_one(name: str, tmp_path: Path) -> None:
    summary = run(name, LEARN, tmp_path).summary
    print(name, {k: summary[k] for k in ("knn_top1", "knn_top1_random", "wall_s")})
    assert summary["knn_top1"] > summary["knn_top1_random"] + 3


#: Stops mid-epoch, after a step checkpoint, so the resume re-enters an epoch half done.
RESUME = [*TINY, "epochs=3", "train.checkpoint_every_steps=3", "eval.baselines=false"]


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("instdisc", []),  # bank and the NCE constant Z
        ("xbm", ['key_encoder.kind="momentum"']),  # memory and momentum encoder
        ("spcl", []),  # hybrid memory, clusters, reliability thresholds, source centroids
        ("mochi", []),
    ],
)
def test_resumed_run_continues_identically(name: str, extra: list[str], tmp_path: Path) -> None:
    reference = run(name, [*RESUME, *extra], tmp_path / "reference")
    # The trainer asks after each of an epoch's 4 steps and at the epoch's end: the 13th ask
    # (12 from 0) follows step 11, in the third epoch.
    polls = iter(range(1000))
    with pytest.raises(Interrupted):
        run(name, [*RESUME, *extra], tmp_path / "stopped", should_stop=lambda: next(polls) == 12)
    resumed = run(name, [*RESUME, *extra], tmp_path / "stopped")
    assert resumed.summary["resumed_from_step"] == 11
    assert resumed.summary["knn_top1"] == pytest.approx(reference.summary["knn_top1"], abs=1e-9)
    losses = [r["loss"] for r in resumed.run_dir.records() if r["kind"] == "step"]
    reference_losses = [r["loss"] for r in reference.run_dir.records() if r["kind"] == "step"]
    assert losses == pytest.approx(reference_losses, abs=1e-5)


def test_mochi_mixes_only_from_its_start_epoch(tmp_path: Path) -> None:
    outcome = run("mochi", [*TINY, "epochs=3", "mixing.start_epoch=2", "mixing.s=5"], tmp_path)
    counts = {
        (r["epoch"], r["synthetic"]) for r in outcome.run_dir.records() if r["kind"] == "step"
    }
    assert counts == {(0, 0), (1, 0), (2, 5 + 64)}  # s' = 64 in the recipe


def test_simclr_v2_evaluates_on_the_first_head_layer() -> None:
    from cltool.methods import build_method

    recipe = load_recipe(RECIPES / "simclr_v2.toml", ["model.width=8"])
    method = build_method(recipe, in_channels=1, num_train=10, num_classes=10)
    head_linears = [m for m in method.encoder.head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(head_linears) == 3
    features = method.backbone(torch.randn(4, 1, 24, 24))
    assert features.shape == (4, recipe.model.head_hidden)


@pytest.mark.parametrize(("start", "full"), [("empty", False), ("random", True)])
def test_queue_start_sets_moco_first_negatives(start: str, full: bool) -> None:
    from cltool.methods import build_method

    recipe = load_recipe(RECIPES / "moco.toml", [f'dictionary.queue_start="{start}"'])
    method = build_method(recipe, in_channels=3, num_train=10, num_classes=10)
    negatives = method.queue.negatives()
    assert len(negatives) == (recipe.dictionary.K if full else 0)
    assert torch.allclose(negatives.norm(dim=1), torch.ones(len(negatives)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['method="simclr"'], 'needs key_encoder.kind = "shared"'),
        (['method="xbm"', 'dictionary.kind="cross_batch"'], "needs loss.kind"),
        (["model.eval_head_layers=1"], "model.eval_head_layers"),
        (['method="instdisc"', "mixing.enabled=true"], "mixing.enabled"),
        (["spcl.eps=0.99"], "spcl.eps = 0.99"),
    ],
)
def test_slots_a_method_cannot_use_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "moco_v1.toml", overrides)


def test_cluster_overlap_matches_the_set_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(-1, 4, 40), rng.integers(-1, 3, 40)

    def members(labels: np.ndarray, i: int) -> set[int]:
        return {i} if labels[i] < 0 else set(np.flatnonzero(labels == labels[i]))

    expected = [
        len(members(a, i) & members(b, i)) / len(members(a, i) | members(b, i)) for i in range(40)
    ]
    np.testing.assert_allclose(cluster_overlap(a, b), expected)


def test_reliable_clusters_find_blobs_and_fix_thresholds_once() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=1)
    points = centres.repeat_interleave(20, 0) + 0.05 * torch.randn(60, 16, generator=generator)
    points = torch.cat([torch.nn.functional.normalize(points, dim=1), torch.eye(16)[:4]])
    thresholds = torch.full((2,), float("nan"), dtype=torch.float64)
    config = SpclConfig(distance="cosine", eps=0.1, reliability_quantile=0.0)
    labels = reliable_clusters(points, config, thresholds)
    assert len(set(labels[:60])) == 3 and (labels[60:] == -1).all()
    assert not thresholds.isnan().any()
    fixed = thresholds.clone()
    reliable_clusters(
        points[torch.randperm(64, generator=generator)], SpclConfig(distance="cosine"), thresholds
    )
    assert torch.equal(thresholds, fixed)


#: The GPU speed options, run on the CPU: bfloat16 autocast and NHWC tensors.
FAST = ['train.precision="bf16"', "train.channels_last=true"]


@pytest.mark.parametrize("name", NAMES)
def test_every_method_trains_under_bf16_autocast_and_channels_last(
    name: str, tmp_path: Path
) -> None:
    outcome = run(name, [*TINY, *FAST, "eval.diagnostics_every_epochs=1"], tmp_path)
    assert outcome.status == DONE
    records = outcome.run_dir.records()
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    if name in ("mochi", "moco_v1"):  # queue methods: the replay runs as the steps ran
        assert any(r["kind"] == "diag" and r["consistency"] > 0.9 for r in records)


def test_bf16_changes_the_loss_only_by_rounding(tmp_path: Path) -> None:
    """The first step's loss under autocast differs from fp32 (bf16 really ran) by little."""
    first = {}
    for label, extra in (("fp32", []), ("bf16", FAST)):
        outcome = run("moco_v1", [*TINY, *extra], tmp_path / label)
        first[label] = next(r["loss"] for r in outcome.run_dir.records() if r["kind"] == "step")
    assert first["bf16"] != first["fp32"]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.02)


def test_compiled_encoders_train_to_the_eager_loss(tmp_path: Path) -> None:
    """train.compile really compiles (dynamo records graphs) and changes the first step's loss
    by round-off only."""
    from torch._dynamo.utils import counters

    first = {}
    for label, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        graphs_before = counters["stats"]["unique_graphs"]
        outcome = run("moco_v1", [*TINY, "epochs=1", *extra], tmp_path / label)
        assert outcome.status == DONE
        compiled_graphs = counters["stats"]["unique_graphs"] - graphs_before
        assert (compiled_graphs > 0) == (label == "compiled")
        first[label] = next(r["loss"] for r in outcome.run_dir.records() if r["kind"] == "step")
    assert first["compiled"] == pytest.approx(first["eager"], rel=1e-4)


@pytest.mark.parametrize("name", ["simclr", "mocov3", "xbm"])
def test_views_encoded_separately_train(name: str, tmp_path: Path) -> None:
    """model.encode_views = "separate" (a pass per view) runs for every two-view method and
    gives another first loss than the joint pass: the BatchNorm statistics differ."""
    first = {}
    for how in ("joint", "separate"):
        outcome = run(name, [*TINY, "epochs=1", f'model.encode_views="{how}"'], tmp_path / how)
        assert outcome.status == DONE
        first[how] = next(r["loss"] for r in outcome.run_dir.records() if r["kind"] == "step")
    assert np.isfinite(first["separate"]) and first["separate"] != first["joint"]
