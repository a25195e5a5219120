"""Self-paced contrastive learning with a hybrid memory (SpCL, Ge et al. 2020).

Unlabelled target images live as instance features in a :class:`~cltool.memory.HybridMemory`.
Before every epoch the memory is clustered with DBSCAN; each reliable cluster becomes one class
(its centroid) and every other image stays a class of its own, so the unified contrastive loss
learns from pseudo-labels where they are trustworthy and falls back to instance discrimination
where they are not. As training sharpens the features, clusters grow: the "self-paced" part.

Labelled source classes join as extra centroids. To stay offline on the embedded data set, the
source domain here is the first ``spcl.source_labelled`` training images with their labels (a
semi-supervised split of one domain rather than a second domain); 0 runs SpCL's unsupervised
setting. Source class centroids follow their batch means with the memory's momentum.

Distances are the paper's k-reciprocal Jaccard distances between memory features
(:mod:`cltool.kreciprocal`), or plain cosine distances as an option; with cosine distances
DBSCAN chains the glyphs' memory into one cluster within two epochs and the encoder collapses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN
from torch import nn

from cltool import dist
from cltool.errors import InputError
from cltool.evaluate import extract_features, reestimate_batchnorm
from cltool.kreciprocal import jaccard_distance
from cltool.memory import HybridMemory, momentum_update
from cltool.methods import Method, Progress
from cltool.methods.parts import build_encoder, evaluation_network
from cltool.recipe import Recipe, SpclConfig

if TYPE_CHECKING:
    from cltool.train import Trainer


def dbscan(distances: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Cluster labels [n] from precomputed distances [n, n]; -1 marks an outlier."""
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distances)


def _as_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels where every outlier is a cluster of its own."""
    labels = labels.copy()
    outliers = labels < 0
    labels[outliers] = labels.max(initial=-1) + 1 + np.arange(outliers.sum())
    return labels


def cluster_overlap(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per point, |I(f) ∩ I'(f)| / |I(f) ∪ I'(f)| with I(f), I'(f) its clusters in the two
    clusterings (an outlier is its own cluster): SpCL's Eq. 6-7."""
    _, a, a_size = np.unique(_as_singletons(labels), return_inverse=True, return_counts=True)
    _, b, b_size = np.unique(_as_singletons(other), return_inverse=True, return_counts=True)
    _, pair, pair_size = np.unique(a * (b.max() + 1) + b, return_inverse=True, return_counts=True)
    shared = pair_size[pair]
    return shared / (a_size[a] + b_size[b] - shared)


def reliable_clusters(
    features: torch.Tensor, cfg: SpclConfig, thresholds: torch.Tensor
) -> np.ndarray:
    """DBSCAN labels [n] of unit ``features`` [n, dim], unreliable members turned outliers.

    With ``cfg.reliability``, a member is kept when its cluster neither merges with others at
    radius eps + δ (independence, R_indep) nor splits at eps - δ (compactness, R_comp), both
    measured as overlaps at least the thresholds α, β. ``thresholds`` [2] holds (α, β); while
    NaN they are set, in place, to the ``cfg.reliability_quantile`` quantiles of this first
    clustering's values, as SpCL fixes them at its first epoch.
    """
    x = features.double().cpu()
    if cfg.distance == "jaccard":
        distances = jaccard_distance(x, cfg.k1, cfg.k2)
    else:
        distances = (1 - x @ x.T).clamp_min(0).numpy()
    labels = dbscan(distances, cfg.eps, cfg.min_samples)
    if not cfg.reliability or (labels < 0).all():
        return labels
    loose = dbscan(distances, cfg.eps + cfg.eps_delta, cfg.min_samples)
    tight = dbscan(distances, max(cfg.eps - cfg.eps_delta, 1e-6), cfg.min_samples)
    scores = np.stack([cluster_overlap(labels, loose), cluster_overlap(labels, tight)], 1)
    clustered = labels >= 0
    if thresholds.isnan().any():
        quantiles = np.quantile(scores[clustered], cfg.reliability_quantile, axis=0)
        thresholds.copy_(torch.from_numpy(quantiles))
    reliable = (scores >= thresholds.cpu().numpy()).all(axis=1)
    return np.where(clustered & reliable, labels, -1)


class SpCL(Method):
    source_centroids: torch.Tensor
    thresholds: torch.Tensor

    def __init__(self, recipe: Recipe, in_channels: int, num_train: int, num_classes: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.num_source = recipe.spcl.source_labelled
        if self.num_source >= num_train:
            raise InputError(
                f"spcl.source_labelled = {self.num_source} leaves no unlabelled image of the "
                f"{num_train} training images: lower it"
            )
        dim = recipe.model.dim
        self.encoder = build_encoder(recipe.model, in_channels)
        self.memory = HybridMemory(num_train - self.num_source, dim, recipe.dictionary.bank_m)
        self.register_buffer(
            "source_centroids", torch.zeros(num_classes if self.num_source else 0, dim)
        )
        self.register_buffer("thresholds", torch.full((2,), math.nan, dtype=torch.float64))
        self.T = recipe.loss.T
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def backbone(self) -> nn.Module:
        return evaluation_network(self.encoder, self.recipe.model.eval_head_layers)

    @torch.no_grad()
    def initialise(self, trainer: Trainer) -> None:
        """Fill the memory and the source centroids with the encoder's features of every
        training image, as SpCL starts from the (pre-trained) encoder's features.

        BatchNorm statistics are re-estimated on the training images first: a fresh encoder's
        running statistics (mean 0, variance 1) map every image to nearly the same feature
        (mean cosine distance ~0.03), DBSCAN then puts all of them in one cluster, and the loss
        collapses the encoder onto it.
        """
        reestimate_batchnorm(self.encoder, trainer.data.train_x, trainer.preprocess, trainer.device)
        features = extract_features(
            self.encoder, trainer.data.train_x, trainer.preprocess, trainer.device
        ).to(self.memory.features.device)  # [n, dim]
        self.memory.features.copy_(features[self.num_source :])
        if self.num_source:
            labels = trainer.data.train_y[: self.num_source].to(features.device)
            sums = torch.zeros_like(self.source_centroids).index_add_(
                0, labels, features[: self.num_source]
            )
            self.source_centroids.copy_(F.normalize(sums, dim=1))

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        """Re-cluster the memory: the pseudo-labels of this epoch."""
        if epoch == 0:
            self.initialise(trainer)
        labels = reliable_clusters(self.memory.features, self.recipe.spcl, self.thresholds)
        self.memory.set_clusters(torch.from_numpy(labels))

    def training_loss(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        progress: Progress,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        indices, labels = indices.to(view_q.device), labels.to(view_q.device)
        f = self.encoder(view_q)  # [B, dim], one view per image
        logits, targets = self.memory.hybrid_logits(  # [B, S + C + O], [B]
            f, (indices - self.num_source).clamp_min(0), self.source_centroids
        )
        targets = torch.where(indices < self.num_source, labels, targets)  # source: its class
        loss = F.cross_entropy(logits / self.T, targets)
        self.pending = (f.detach().to(self.memory.features.dtype), indices, labels)  # bf16 -> fp32
        logs = {
            "clusters": self.memory.num_clusters.clone(),
            "outliers": (self.memory.cluster_labels < 0).sum(),
            "pos_sim": logits.detach().gather(1, targets[:, None]).mean(),
            "neg_sim": logits.detach().mean(),
        }
        return loss, logs

    @torch.no_grad()
    def end_step(self) -> None:
        """Momentum-update the target instances' features and the source classes' centroids,
        with all ranks' entries, so the ranks hold the same memory."""
        f, indices, labels = (dist.all_gather_no_grad(t) for t in self.pending)
        is_source = indices < self.num_source
        self.memory.update(indices[~is_source] - self.num_source, f[~is_source])
        if is_source.any():
            source_labels = labels[is_source]
            sums = torch.zeros_like(self.source_centroids).index_add_(
                0, source_labels, f[is_source]
            )
            counts = torch.bincount(source_labels, minlength=len(sums))
            present = counts > 0
            means = sums[present] / counts[present, None]
            centroids = momentum_update(self.source_centroids[present], means, self.memory.m)
            self.source_centroids[present] = F.normalize(centroids, dim=1)
