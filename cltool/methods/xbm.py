"""Cross-Batch Memory (Wang et al. 2020) for metric-learning losses on labelled data.

Once the embedding has warmed up it drifts slowly, so the embeddings of recent batches, stored
with their labels, are nearly as good as fresh ones: they give a batch's anchors many more
positive and negative pairs at no encoding cost. The loss is the recipe's ``loss.kind``
(contrastive, triplet, lifted structure or circle loss) over the batch's pairs and, after
``dictionary.warmup_steps``, the memory's.

The key-encoder slot is MoCo's: with ``key_encoder.kind = "shared"`` (the paper) both views are
anchors and their embeddings enter the memory; with ``"momentum"`` (a combination no paper did)
the first view's embeddings are the anchors and a momentum encoder embeds the second view into
the memory, so the memory's entries drift even less.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cltool import dist
from cltool.losses import circle_loss, contrastive_loss, lifted_structure_loss, triplet_loss
from cltool.memory import CrossBatchMemory
from cltool.methods import Progress
from cltool.methods.moco import MoCo
from cltool.methods.parts import encode_views
from cltool.recipe import LossConfig, Recipe

#: (anchors [B, dim], labels [B], reference embeddings [M, dim] | None, their labels) -> loss
MetricLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]


def metric_loss(cfg: LossConfig) -> MetricLoss:
    """The recipe's metric-learning loss with its knobs bound."""
    losses: dict[str, MetricLoss] = {
        "contrastive": lambda e, y, re, ry: contrastive_loss(e, y, cfg.margin, re, ry),
        "triplet": lambda e, y, re, ry: triplet_loss(e, y, cfg.margin, cfg.mining, re, ry),
        "lifted": lambda e, y, re, ry: lifted_structure_loss(e, y, cfg.margin, re, ry),
        "circle": lambda e, y, re, ry: circle_loss(e, y, cfg.margin, cfg.gamma, re, ry),
    }
    return losses[cfg.kind]


class XBM(MoCo):
    def __init__(self, recipe: Recipe, in_channels: int) -> None:
        super().__init__(recipe, in_channels)
        self.memory = CrossBatchMemory(recipe.dictionary.K, recipe.model.dim)
        self.loss = metric_loss(recipe.loss)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def training_loss(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        progress: Progress,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = labels.to(view_q.device)
        batch = len(labels)
        if self.momentum_keys:
            anchors, anchor_labels = self.encode_queries(view_q), labels  # [B, dim]
            new = self.encode_keys(view_k, self.momentum(progress), progress.seed)  # [B, dim]
            positives, references, reference_labels = new, [new], [labels]
        else:
            pair = encode_views(self.encode_queries, view_q, view_k, self.recipe.model.encode_views)
            anchors = torch.cat(pair)  # [2B, dim]
            anchor_labels = labels.repeat(2)
            new = anchors.detach()
            positives, references, reference_labels = new[batch:], [], []
        if progress.global_step >= self.recipe.dictionary.warmup_steps:
            stored, stored_labels = self.memory.contents()  # [M, dim], from before this batch
            references.append(stored)
            reference_labels.append(stored_labels)
        ref = torch.cat(references) if references else None
        ref_labels = torch.cat(reference_labels) if reference_labels else None
        loss = self.loss(anchors, anchor_labels, ref, ref_labels)
        self.pending = (new, anchor_labels)  # the entries' labels are the anchors' in both cases
        logs = {
            "memory": self.memory.filled.clone(),
            "pos_sim": (anchors.detach()[:batch] * positives).sum(1).mean(),
        }
        return loss, logs

    @torch.no_grad()
    def end_step(self) -> None:
        """Enqueue the batch after the loss read the memory (so no anchor meets its own copy);
        all ranks' entries in rank order, so the ranks hold the same memory."""
        embeddings, labels = self.pending
        self.memory.enqueue(dist.all_gather_no_grad(embeddings), dist.all_gather_no_grad(labels))
