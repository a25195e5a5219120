"""SimCLR v1/v2 (Chen et al. 2020a, 2020b) and SupCon (Khosla et al. 2020): one shared encoder
and the batch itself as the dictionary.

By default both views of all N images go through the encoder in one forward pass, so BatchNorm
sees all 2N views at once (SimCLR's global BN on one device); ``model.encode_views =
"separate"`` makes a pass per view instead. SimCLR v2 is a recipe setting:
``model.head_layers = 3`` and ``model.eval_head_layers = 1``. SupCon is SimCLR with the data
set's labels deciding the positives.
"""

from __future__ import annotations

import torch

from cltool import dist
from cltool.losses import nt_xent, supcon
from cltool.methods import Method, Progress
from cltool.methods.parts import (
    build_encoder,
    encode_views,
    evaluation_network,
    pair_similarities,
)
from cltool.recipe import Recipe


class SimCLR(Method):
    def __init__(self, recipe: Recipe, in_channels: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.encoder = build_encoder(recipe.model, in_channels)
        self.T = recipe.loss.T

    @property
    def backbone(self) -> torch.nn.Module:
        return evaluation_network(self.encoder, self.recipe.model.eval_head_layers)

    def contrastive_loss(
        self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """NT-Xent: each of the 2N views has its other view as positive, 2N - 2 negatives."""
        return nt_xent(z1, z2, self.T)

    def training_loss(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        progress: Progress,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = encode_views(self.encoder, view_q, view_k, self.recipe.model.encode_views)
        # Every rank computes the loss of the global batch (all ranks' views, rank order).
        z1, z2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
        labels = dist.all_gather_no_grad(labels.to(z1.device))
        loss = self.contrastive_loss(z1, z2, labels)
        return loss, pair_similarities(z1.detach(), z2.detach())


class SupCon(SimCLR):
    def contrastive_loss(
        self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """L_out: every other view with the anchor's label is a positive, scaled by T/base_T."""
        views = torch.stack([z1, z2], dim=1)  # [N, 2, dim]
        return supcon(views, labels, self.T, self.recipe.loss.base_T)
