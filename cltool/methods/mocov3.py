"""MoCo v3, ResNet variant (Chen, Xie & He 2021): MoCo's momentum key encoder without a queue.

Large batches make the batch's own keys a sufficient dictionary. Each view is a query for the
other view's key, the loss is symmetrised, and the query side carries a predictor head (as in
BYOL) that the key encoder lacks. The momentum follows the recipe's ``m`` and ``m_schedule``
(the paper: 0.99 rising to 1 with a cosine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cltool import dist
from cltool.methods import Progress
from cltool.methods.moco import MoCo
from cltool.methods.parts import (
    encode_views,
    hidden_layer,
    in_batch_info_nce,
    pair_similarities,
)
from cltool.recipe import Recipe


class MoCoV3(MoCo):
    def __init__(self, recipe: Recipe, in_channels: int) -> None:
        super().__init__(recipe, in_channels)
        dim, hidden = recipe.model.dim, recipe.model.predictor_hidden
        # The paper's predictor: Linear-BN-ReLU-Linear, no BatchNorm on the output.
        self.predictor = nn.Sequential(hidden_layer(dim, hidden, bn=True), nn.Linear(hidden, dim))

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """ctr(q, k) = 2T · InfoNCE over in-batch keys; the 2T factor makes the gradient's scale
        independent of T, as in the paper's pseudo-code."""
        return 2 * self.T * in_batch_info_nce(q, k, self.T)

    def predicted_queries(self, views: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.encode_queries(views)), dim=1)

    def training_loss(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        progress: Progress,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m, how = self.momentum(progress), self.recipe.model.encode_views
        q1, q2 = encode_views(self.predicted_queries, view_q, view_k, how)  # [B, dim] each
        self.advance_key_encoder(m)
        k1, k2 = encode_views(lambda v: self.current_keys(v, progress.seed), view_q, view_k, how)
        # The global batch's keys are the dictionary: [world_size * B, dim] each, rank order.
        q1, q2 = dist.all_gather_with_grad(q1), dist.all_gather_with_grad(q2)
        k1, k2 = dist.all_gather_no_grad(k1), dist.all_gather_no_grad(k2)
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return loss, {"m": torch.tensor(m), **pair_similarities(q1.detach(), k2)}
