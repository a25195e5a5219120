"""Instance discrimination with a memory bank (Wu et al. 2018).

Every training image is its own class. Instead of a weight vector per class, the classifier is
non-parametric: a memory bank holding one L2-normalised feature per image, refreshed with a
momentum average each time the image is seen. One augmented view per image and step (the
recipe's ``view_q``) is encoded; the loss is the full softmax over all n bank entries
(``loss.kind = "infonce"``) or its NCE approximation with ``dictionary.nce_k`` noise entries
(``loss.kind = "nce"``), whose normalising constant Z is estimated once, at the first step, as in
the paper, and kept in a buffer so a resumed run uses the same Z.
"""

from __future__ import annotations

import torch
from torch import nn

from cltool import dist
from cltool.losses import estimate_Z, instance_softmax, nce_loss
from cltool.memory import MemoryBank
from cltool.methods import Method, Progress
from cltool.methods.parts import build_encoder, evaluation_network
from cltool.recipe import Recipe


class InstDisc(Method):
    Z: torch.Tensor

    def __init__(self, recipe: Recipe, in_channels: int, num_train: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.encoder = build_encoder(recipe.model, in_channels)
        self.bank = MemoryBank(num_train, recipe.model.dim, recipe.dictionary.bank_m)
        self.register_buffer("Z", torch.zeros((), dtype=torch.float64))  # 0: not yet estimated
        self.T = recipe.loss.T
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def backbone(self) -> nn.Module:
        return evaluation_network(self.encoder, self.recipe.model.eval_head_layers)

    def nce(
        self, f: torch.Tensor, positives: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NCE loss and the noise logits [B, K].

        The K noise entries are drawn once per step and shared by the batch: each is still a
        draw from Pn = 1/n, and a shared draw costs one [K, dim] gather instead of B of them.
        """
        n = self.bank.features.shape[0]
        generator = torch.Generator().manual_seed(seed)
        noise = self.bank.entries(self.bank.sample(self.recipe.dictionary.nce_k, generator))
        noise_logits = f @ noise.T  # [B, K]
        if self.Z.item() == 0:
            # From all ranks' logits, so every rank holds the Z of the global batch.
            self.Z.fill_(estimate_Z(dist.all_gather_no_grad(noise_logits), self.T, n))
        return nce_loss(
            (f * positives).sum(1), noise_logits, self.T, n, self.Z.item()
        ), noise_logits

    def training_loss(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        progress: Progress,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        indices = indices.to(view_q.device)
        f = self.encoder(view_q)  # [B, dim]
        positives = self.bank.entries(indices)  # [B, dim]: each image's own, stale, entry
        if self.recipe.loss.kind == "nce":
            loss, negative_logits = self.nce(f, positives, progress.seed)
        else:
            loss = instance_softmax(f, self.bank.features, indices, self.T)
            negative_logits = f.detach() @ self.bank.features.T  # [B, n], own entry included
        self.pending = (f.detach(), indices)
        logs = {
            "pos_sim": (f.detach() * positives).sum(1).mean(),
            "neg_sim": negative_logits.detach().mean(),
            "Z": self.Z.clone(),
        }
        return loss, logs

    @torch.no_grad()
    def end_step(self) -> None:
        """v_i <- normalise(m v_i + (1 - m) f_i), after the loss has read the old entries; all
        ranks' entries, so the ranks hold the same bank."""
        features, indices = self.pending
        self.bank.update(dist.all_gather_no_grad(indices), dist.all_gather_no_grad(features))
