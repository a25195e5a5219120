"""Diagnostics of a queue dictionary that no peer logs: consistency and negative hardness.

MoCo's argument for a momentum encoder is *consistency*: the keys in the queue were encoded by
earlier key encoders, and they only compare well with new keys if the key encoder changed
little since. This module measures it directly: it replays training steps whose keys are still
in the queue (the same images, the same augmentation draws, hence the same views, rebuilt from
the step seeds) through the key encoder as it is now, and reports the mean cosine between each
stored key and its re-encoding. 1 means the stored keys are exactly what the key encoder would
produce now; m = 0 (the key encoder is the fast-moving query encoder) gives clearly less.

Negative hardness replays the last step: mean and max similarity of its queries to the queue
(as the step saw it, own stale keys left out when the recipe excludes them), the positive
similarity, and, using the data set's labels, which share of each query's hardest negatives is
the same class (false negatives) or the query's own earlier key.

Replays run in train mode (the BatchNorm statistics of a replayed batch are those the step
used) without gradient, and every BatchNorm running statistic is restored afterwards, so
turning diagnostics on changes nothing in training or evaluation. Under torch.distributed every
rank replays its own block of each step, as it trained on it (its images, its augmentation
seed, the shuffle-BN collective), and the results are gathered in rank order, the queue's
order, so every rank computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cltool import dist
from cltool.methods.moco import MoCo

if TYPE_CHECKING:
    from cltool.train import Trainer

#: Hardest negatives per query inspected for same-class (false) negatives.
HARDEST = 10
#: Most queue batches replayed for the consistency measure, spread over the queue's ages.
REPLAYED_BATCHES = 4


@dataclass(frozen=True)
class QueuedBatch:
    """One past step whose keys are still in the queue."""

    epoch: int
    step: int
    indices: torch.Tensor  # [B] training-image ids, in batch order
    slots: torch.Tensor  # [B] queue slots holding the batch's keys, in batch order


@contextmanager
def batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Run train-mode forwards whose BatchNorm running-statistic updates are undone after."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])


def queued_batches(trainer: Trainer, queue_filled: int, ptr: int, K: int) -> list[QueuedBatch]:
    """The past steps whose keys fill the queue, newest first, walking back from its pointer.

    A step's B keys sit in the B slots before the pointer as it was after that step; a batch
    already partly overwritten ends the walk.
    """
    from cltool.train import batches_of_epoch

    recipe = trainer.recipe
    batches: list[QueuedBatch] = []
    end, held = ptr, 0
    global_step = trainer.state.global_step
    while global_step > 0:
        global_step -= 1
        epoch, step = divmod(global_step, trainer.steps_per_epoch)
        indices = batches_of_epoch(
            len(trainer.data.train_x),
            recipe.train.batch_size,
            recipe.train.seed,
            epoch,
            trainer.world_size,
        )[step]
        held += len(indices)
        if held > queue_filled:
            break
        slots = (end - len(indices) + torch.arange(len(indices))) % K
        batches.append(QueuedBatch(epoch, step, indices, slots))
        end -= len(indices)
    return batches


def replay_views(trainer: Trainer, batch: QueuedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The two augmented views [b, C, H, W] the step made of this rank's block."""
    images = trainer.batch_images(dist.own_rows(batch.indices))
    return trainer.step_views(images, batch.epoch, batch.step)


def replay_keys(trainer: Trainer, method: MoCo, batch: QueuedBatch) -> torch.Tensor:
    """Keys [B, dim] of a past step's images (all ranks'), by the key encoder as it is now."""
    from cltool.train import step_seed

    _, view_k = replay_views(trainer, batch)
    if not method.momentum_keys:
        keys = method.encoder_q(view_k)
    else:
        seed = step_seed(trainer.recipe.train.seed, batch.epoch, batch.step)
        keys = method.key_forward(view_k, seed)
    return dist.all_gather_no_grad(keys)


def consistency(trainer: Trainer, method: MoCo, batches: list[QueuedBatch]) -> dict[str, float]:
    """Mean cosine between stored keys and their re-encoding, over batches spread in age."""
    stride = max(1, len(batches) // REPLAYED_BATCHES)
    sampled = batches[::stride][:REPLAYED_BATCHES]
    per_batch = [
        (method.queue.keys[b.slots] * replay_keys(trainer, method, b)).sum(1).mean().item()
        for b in sampled
    ]
    return {
        "consistency": sum(per_batch) / len(per_batch),
        "consistency_oldest": per_batch[-1],
        "consistency_age_steps": float(batches.index(sampled[-1])),
    }


def hardness(trainer: Trainer, method: MoCo, newest: QueuedBatch) -> dict[str, float]:
    """Negative hardness of the last step's queries against the queue that step saw."""
    queue = method.queue
    view_q, _ = replay_views(trainer, newest)
    q = dist.all_gather_no_grad(method.encode_queries(view_q))  # [B, dim]
    k = queue.keys[newest.slots]  # [B, dim]: the step's own keys
    seen = torch.ones(int(queue.filled), dtype=torch.bool, device=q.device)
    seen[newest.slots] = False  # enqueued after the step's loss
    negatives, negative_ids = queue.negatives()[seen], queue.negative_ids()[seen]  # [K', ...]
    if len(negatives) == 0:
        return {}
    ids = newest.indices.to(q.device)
    own = ids[:, None] == negative_ids[None, :]  # [B, K']
    sims = q @ negatives.T  # [B, K']
    if trainer.recipe.dictionary.exclude_own_keys:
        sims = sims.masked_fill(own, -torch.inf)
    hardest = sims.topk(min(HARDEST, sims.shape[1]), dim=1).indices  # [B, H]
    labels = trainer.data.train_y.to(q.device)
    same_class = labels[negative_ids[hardest]] == labels[ids][:, None]  # [B, H]
    finite = sims.isfinite()
    return {
        "pos_sim": (q * k).sum(1).mean().item(),
        "neg_sim_mean": (sims.where(finite, 0).sum() / finite.sum()).item(),
        "neg_sim_max": sims.amax(1).mean().item(),
        "false_negative_share": same_class.float().mean().item(),
        "own_key_share": own.gather(1, hardest).float().mean().item(),
    }


@torch.no_grad()
def measure(trainer: Trainer) -> dict[str, float]:
    """All diagnostics that apply to the trainer's method; empty where none does (a method
    without a queue of keys)."""
    method = trainer.method
    if not isinstance(method, MoCo) or method.queue is None:
        return {}
    queue = method.queue
    batches = queued_batches(trainer, int(queue.filled), int(queue.ptr), queue.keys.shape[0])
    if not batches:
        return {}
    with batchnorm_stats_kept(method):
        return {**consistency(trainer, method, batches), **hardness(trainer, method, batches[0])}
