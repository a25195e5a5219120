"""Distributed training on CPU with gloo and two local processes: the cross-rank queue, the
gathers with gradients, shuffle-BN and a whole ``cl run --nproc 2``.

Each check runs in processes started by the same launcher ``cl run --nproc`` uses; a worker
saves what it saw under ``tmp_path`` and the test compares the ranks there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MOCO, TINY, run_cl
from rich.console import Console

from cltool import diagnostics, dist
from cltool.display import Display
from cltool.methods import Progress, build_method
from cltool.recipe import load_recipe
from cltool.track import DONE, RunDir
from cltool.train import Trainer

WORLD = 2

#: Eight images per rank and step, four steps, no evaluation to speak of.
SMALL = [
    "train.epochs=1",
    "train.batch_size=16",
    "data.num_train=64",
    "data.num_test=32",
    "model.width=8",
    "model.head_hidden=32",
    "model.dim=16",
    "K=256",
    "eval.every_epochs=0",
    "eval.linear=false",
    "eval.baselines=false",
    "train.threads=1",
]


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that breaks fails within a minute instead of waiting on a collective."""
    monkeypatch.setenv(dist.TIMEOUT_ENV, "60")


def joined(target: Callable[..., None], *args: object) -> None:
    """``target(*args)`` inside the process group, left cleanly afterwards."""
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))
    try:
        target(*args)
    finally:
        dist.shutdown()


def moco_steps(folder: Path) -> None:
    """A short MoCo run that records every step's keys and the final queue and parameters."""
    recipe = load_recipe(MOCO, SMALL)
    display = Display(Console(quiet=True), log_path=None, quiet=True)
    trainer = Trainer(recipe, RunDir(folder / "run"), display, log=lambda record: None)
    method, keys = trainer.method, []
    end_step = method.end_step

    def recording_end_step() -> None:
        keys.append(method.pending_keys[0].clone())
        end_step()

    method.end_step = recording_end_step
    (folder / "run").mkdir(exist_ok=True)
    trainer.run()
    torch.save(
        {
            "keys": keys,
            "queue": method.queue.negatives().clone(),
            "params": {k: v.detach().clone() for k, v in method.named_parameters()},
        },
        folder / f"rank{dist.rank()}.pt",
    )


def test_moco_queue_and_parameters_agree_across_ranks(tmp_path: Path) -> None:
    dist.launch_local(WORLD, joined, moco_steps, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    steps = len(ranks[0]["keys"])
    assert steps == 4
    expected = torch.cat([ranks[r]["keys"][s] for s in range(steps) for r in range(WORLD)])
    assert torch.equal(ranks[0]["queue"], expected)  # both ranks' keys, rank order, per step
    assert not torch.equal(ranks[0]["keys"][0], ranks[1]["keys"][0])
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name


def replayed_diagnostics(folder: Path) -> None:
    """After a short MoCo run: the newest queued step replayed through the unchanged key encoder,
    and the full diagnostics, as this rank computes them."""
    recipe = load_recipe(MOCO, SMALL)
    display = Display(Console(quiet=True), log_path=None, quiet=True)
    trainer = Trainer(recipe, RunDir(folder / "run"), display, log=lambda record: None)
    (folder / "run").mkdir(exist_ok=True)
    trainer.run()
    queue = trainer.method.queue
    filled, ptr = int(queue.filled), int(queue.ptr)
    batches = diagnostics.queued_batches(trainer, filled, ptr, len(queue.keys))
    with torch.no_grad(), diagnostics.batchnorm_stats_kept(trainer.method):
        replayed = diagnostics.replay_keys(trainer, trainer.method, batches[0])
        measured = diagnostics.measure(trainer)
    stored = queue.keys[batches[0].slots]
    torch.save({"stored": stored, "replayed": replayed, "measured": measured},
               folder / f"rank{dist.rank()}.pt")  # fmt: skip


def test_diagnostics_replay_each_ranks_block_as_it_trained(tmp_path: Path) -> None:
    """The last step's keys, re-encoded by the key encoder that made them (it has not moved
    since), come back equal to the queue's: the right images, augmentation seeds and shuffle,
    on every rank; both ranks report the same diagnostics."""
    dist.launch_local(WORLD, joined, replayed_diagnostics, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for saved in ranks:
        assert saved["replayed"].shape == saved["stored"].shape == (16, 16)
        torch.testing.assert_close(saved["replayed"], saved["stored"], atol=1e-5, rtol=0)
    assert ranks[0]["measured"] == ranks[1]["measured"]
    assert ranks[0]["measured"]["consistency"] > 0.9


def global_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views [2B, 3, 16, 16] and labels with repeats (SupCon's positives), float64."""
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(2, WORLD * batch, 3, 16, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (WORLD * batch,), generator=generator)
    return views[0], views[1], labels


def loss_and_grads(method_name: str, folder: Path, batch: int) -> None:
    """Loss and averaged gradients of one step, on this rank's block of the global batch (or on
    all of it, out of a process group). BatchNorm runs on its running statistics (eval mode):
    with batch statistics, two blocks of B are not one batch of 2B by design."""
    torch.set_default_dtype(torch.float64)
    overrides = ['key_encoder.kind="shared"', 'dictionary.kind="in_batch"']
    recipe = load_recipe(MOCO, [*SMALL, f'method="{method_name}"', *overrides])
    torch.manual_seed(0)
    method = build_method(recipe, 3, 64, 3).eval()
    model = method
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(method)
    view_q, view_k, labels = (dist.own_rows(t) for t in global_batch(batch))
    indices = dist.own_rows(torch.arange(WORLD * batch))
    loss, _ = model(view_q, view_k, indices, labels, Progress(0, 0, 1, 0))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads}, folder / f"rank{dist.rank()}.pt")


@pytest.mark.parametrize("method_name", ["simclr", "supcon"])
def test_gathered_loss_equals_the_global_batch_loss(
    method_name: str, tmp_path: Path, float64: None
) -> None:
    """2 processes x batch B give the loss and gradients of 1 process x batch 2B."""
    batch = 4
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    loss_and_grads(method_name, tmp_path / "one", batch)
    dist.launch_local(WORLD, joined, loss_and_grads, method_name, tmp_path / "two", batch)
    reference = torch.load(tmp_path / "one" / "rank0.pt")
    assert reference["grads"], "no gradient reached the encoder"
    for r in range(WORLD):
        ranked = torch.load(tmp_path / "two" / f"rank{r}.pt")
        torch.testing.assert_close(ranked["loss"], reference["loss"], atol=1e-6, rtol=0)
        assert ranked["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(ranked["grads"][name], grad, atol=1e-6, rtol=0)


def shuffled_keys(folder: Path) -> None:
    """MoCo's key forward through a key encoder that is one BatchNorm (momentum 1: its running
    mean is the last batch's mean), on distinct rows per rank."""
    recipe = load_recipe(MOCO, SMALL)
    method = build_method(recipe, 3, 64, 3)
    method.encoder_k = torch.nn.BatchNorm1d(5, momentum=1.0, affine=False)
    generator = torch.Generator().manual_seed(1 + dist.rank())
    rows = torch.randn(6, 5, generator=generator) + 10 * dist.rank()
    keys = method.key_forward(rows, seed=123)
    torch.save(
        {"rows": rows, "keys": keys, "mean": method.encoder_k.running_mean.clone()},
        folder / f"rank{dist.rank()}.pt",
    )


def test_shuffle_bn_normalises_a_permuted_batch_and_returns_keys_in_order(
    tmp_path: Path,
) -> None:
    dist.launch_local(WORLD, joined, shuffled_keys, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    rows = torch.cat([saved["rows"] for saved in ranks])  # the global batch, rank order
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(123))
    blocks = rows[order].chunk(WORLD)
    normalised = torch.cat([F.batch_norm(b, None, None, training=True) for b in blocks])
    expected = normalised[torch.argsort(order)].chunk(WORLD)
    for r, saved in enumerate(ranks):
        torch.testing.assert_close(saved["mean"], blocks[r].mean(0))  # stats of the permuted block
        assert not torch.allclose(saved["mean"], saved["rows"].mean(0))  # not of its own rows
        torch.testing.assert_close(saved["keys"], expected[r])  # each key of its own row


def cl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cl(*args, cwd=cwd, timeout=300)


def test_cl_run_nproc_2_writes_one_summary_with_world_size_2(tmp_path: Path) -> None:
    overrides = [a for s in [*TINY, "train.threads=1"] for a in ("--set", s)]
    result = cl("run", str(MOCO), "--nproc", "2", "--out", "runs", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dirs = list((tmp_path / "runs" / "moco").iterdir())
    assert len(run_dirs) == 1
    run_dir = RunDir(run_dirs[0])
    summary = json.loads(run_dir.summary_file.read_text())
    assert summary["world_size"] == 2 and summary["epochs_done"] == 1
    assert run_dir.state()["status"] == DONE
    records = run_dir.records()
    assert [r["kind"] for r in records].count("eval") == 1  # evaluated once, by rank 0
    assert [r["kind"] for r in records].count("epoch") == 1
    assert result.stdout.count("kNN top-1, trained encoder") == 1


def test_batch_not_divisible_by_the_world_size_is_a_recipe_error(tmp_path: Path) -> None:
    overrides = [a for s in [*TINY, "train.batch_size=63"] for a in ("--set", s)]
    result = cl("run", str(MOCO), "--nproc", "2", "--out", "runs", *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert "train.batch_size = 63" in result.stderr and "world size 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("target", ["launcher", "process group"])
def test_ctrl_c_under_nproc_stops_every_rank_at_a_checkpoint_and_exits_130(
    target: str, tmp_path: Path
) -> None:
    """The terminal's Ctrl-C reaches the whole process group; ``kill -INT`` only the launcher,
    which passes it on. Either way: one clean stop, no "rank failed", exit code 130."""
    overrides = [*TINY, "train.threads=1", "epochs=50", "train.log_every_steps=1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cltool", "run", str(MOCO), "--nproc", "2", "--out", "runs"]
        + [a for s in overrides for a in ("--set", s)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        start_new_session=True,  # its own process group, as a terminal gives a foreground job
    )
    run_dir = RunDir.for_run(tmp_path / "runs", "moco", load_recipe(MOCO, overrides).fingerprint)
    deadline = time.monotonic() + 120
    while not run_dir.metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if target == "launcher":
        process.send_signal(signal.SIGINT)
    else:
        os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "failed" not in stderr and "Traceback" not in stderr
    assert "stopping after this step" in stderr
    assert run_dir.state()["status"] == "interrupted"
    assert run_dir.checkpoint.exists()


def test_sync_bn_on_cpu_ranks_is_refused_before_anything_runs(tmp_path: Path) -> None:
    overrides = [a for s in [*TINY, "model.sync_bn=true"] for a in ("--set", s)]
    result = cl("run", str(MOCO), "--nproc", "2", "--out", "runs", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "model.sync_bn = true" in result.stderr and "set model.sync_bn = false" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, SyncBN)")
def test_sync_bn_run_on_two_gpus_trains_to_the_end(tmp_path: Path) -> None:
    overrides = [*TINY, "model.sync_bn=true", 'train.device="cuda"']
    result = cl(
        "run", str(MOCO), "--nproc", "2", "--out", "runs",
        *[a for s in overrides for a in ("--set", s)], cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs" / "moco").iterdir()
    summary = json.loads(RunDir(run_dir).summary_file.read_text())
    assert summary["world_size"] == 2 and summary["device"].startswith("cuda")
