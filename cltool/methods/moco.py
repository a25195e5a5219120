"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): a query encoder, a momentum key encoder and a
FIFO queue of keys as the dictionary, trained with InfoNCE; optionally with MoCHi's synthetic
hard negatives (Kalantidis et al. 2020).

v1 and v2 are the same code: v2 is an MLP head, stronger augmentation and a cosine learning rate,
all recipe settings. The slots are honoured as the recipe sets them: ``key_encoder.kind =
"shared"`` encodes keys with the query encoder (MoCo's end-to-end ablation) and
``dictionary.kind = "in_batch"`` uses the batch's other keys as negatives instead of the queue.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cltool import dist
from cltool.losses import info_nce
from cltool.memory import KeyQueue, cosine_momentum, update_momentum_encoder
from cltool.methods import Method, Progress
from cltool.methods.parts import build_encoder, evaluation_network
from cltool.mixing import mochi_negatives
from cltool.recipe import Recipe


class MoCo(Method):
    def __init__(self, recipe: Recipe, in_channels: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.encoder_q = build_encoder(recipe.model, in_channels)
        self.momentum_keys = recipe.key_encoder.kind == "momentum"
        if self.momentum_keys:
            self.encoder_k = copy.deepcopy(self.encoder_q)
            self.encoder_k.requires_grad_(False)
        self.queue = (
            KeyQueue(
                recipe.dictionary.K,
                recipe.model.dim,
                start_full=recipe.dictionary.queue_start == "random",
            )
            if recipe.dictionary.kind == "queue"
            else None
        )
        self.T = recipe.loss.T
        self.pending_keys: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def backbone(self) -> nn.Module:
        return evaluation_network(self.encoder_q, self.recipe.model.eval_head_layers)

    @property
    def query_encoder(self) -> nn.Module:
        return self.encoder_q

    def momentum(self, progress: Progress) -> float:
        m = self.recipe.key_encoder.m
        if self.recipe.key_encoder.m_schedule == "cosine":
            return cosine_momentum(m, progress.fraction)
        return m

    def synthetic_negatives(
        self, q: torch.Tensor, negatives: torch.Tensor, progress: Progress
    ) -> torch.Tensor | None:
        """MoCHi's mixed hard negatives [B, s + s', dim], once its start epoch is reached."""
        mixing = self.recipe.mixing
        if not mixing.enabled or progress.epoch < mixing.start_epoch:
            return None
        generator = torch.Generator(device=q.device).manual_seed(progress.seed)
        return mochi_negatives(q, negatives, mixing.N, mixing.s, mixing.s_prime, generator)

    def bn_groups(self, batch: int) -> int:
        """BatchNorm groups for a batch: ``model.bn_splits``, or 1 when a group would hold
        fewer than 2 images."""
        splits = self.recipe.model.bn_splits
        return 1 if batch < 2 * splits else splits

    def encode_queries(self, view_q: torch.Tensor) -> torch.Tensor:
        splits = self.bn_groups(len(view_q))
        if splits == 1:
            return self.encoder_q(view_q)
        return torch.cat([self.encoder_q(chunk) for chunk in view_q.chunk(splits)])

    def encode_keys(self, view_k: torch.Tensor, m: float, seed: int) -> torch.Tensor:
        """The step's keys: move the key encoder towards the query encoder, then encode."""
        self.advance_key_encoder(m)
        return self.current_keys(view_k, seed)

    @torch.no_grad()
    def advance_key_encoder(self, m: float) -> None:
        if self.momentum_keys:
            update_momentum_encoder(self.encoder_k, self.encoder_q, m)

    def current_keys(self, view_k: torch.Tensor, seed: int) -> torch.Tensor:
        """Keys from the key encoder as it is now (the query encoder, for shared keys)."""
        if not self.momentum_keys:
            return self.encoder_q(view_k)
        return self.key_forward(view_k, seed)

    @torch.no_grad()
    def key_forward(self, view_k: torch.Tensor, seed: int) -> torch.Tensor:
        """Keys [B, dim] from the momentum encoder as it is now: the step's key computation
        without the momentum update, which the consistency diagnostic replays."""
        if dist.world_size() > 1:
            # Shuffle-BN across ranks: each rank's BatchNorm sees a random block of the global
            # batch (the permutation drawn from the step's seed, the same on every rank), and
            # each rank gets back the keys of its own images, in their order.
            shuffled, order = dist.shuffle_across_ranks(view_k, seed)
            return dist.unshuffle(self.encoder_k(shuffled), order)
        splits = self.bn_groups(len(view_k))
        if splits == 1:
            return self.encoder_k(view_k)
        # Shuffle-BN on one device: the keys' BatchNorm groups hold other images than their
        # queries' groups, so batch statistics cannot tell the positive from the queue.
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(view_k), generator=generator).to(view_k.device)
        keys = torch.cat([self.encoder_k(c) for c in view_k[order].chunk(splits)])
        return keys[torch.argsort(order)]

    def training_loss(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        progress: Progress,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.momentum(progress)
        q = self.encode_queries(view_q)  # [B, dim]
        k = self.encode_keys(view_k, m, progress.seed)  # [B, dim]
        synthetic = None  # MoCHi's negatives [B, s + s', dim], queue only
        if self.queue is None:
            logits = q @ k.T  # [B, B]: the batch's other keys are the negatives
            loss = F.cross_entropy(logits / self.T, torch.arange(len(q), device=q.device))
            off_diagonal = logits.detach().sum() - logits.detach().diagonal().sum()
            negative_sim = off_diagonal / (len(q) * (len(q) - 1))
        else:
            negatives = self.queue.negatives()  # [K, dim]; the batch's own keys at the first step
            indices = indices.to(q.device)  # the queue's ids live with its keys
            own_keys = None
            if len(negatives) == 0:
                negatives = k.detach()
            elif self.recipe.dictionary.exclude_own_keys:
                own_keys = self.queue.stale_key_mask(indices)  # [B, K]
            synthetic = self.synthetic_negatives(q, negatives, progress)
            loss = info_nce(q, k, negatives, self.T, synthetic, own_keys)
            negative_sim = (q.detach() @ negatives.T).mean()
            self.pending_keys = (k.detach(), indices)
        logs = {
            "m": torch.tensor(m),
            "pos_sim": (q.detach() * k.detach()).sum(1).mean(),
            "neg_sim": negative_sim,
        }
        if self.recipe.mixing.enabled:
            logs["synthetic"] = torch.tensor(0 if synthetic is None else synthetic.shape[1])
        return loss, logs

    @torch.no_grad()
    def end_step(self) -> None:
        """Enqueue this step's keys, after the backward pass that still reads the queue (MoCo
        clones the queue instead; enqueueing afterwards avoids that copy). Every rank enqueues
        all ranks' keys in rank order, so the ranks hold the same queue."""
        if self.queue is not None:
            keys, ids = self.pending_keys
            self.queue.enqueue(dist.all_gather_no_grad(keys), dist.all_gather_no_grad(ids))
