"""Frozen-feature evaluation: weighted kNN (the InstDisc monitor) and a linear probe.

Both read the backbone's features, never the projection head's: the head is trained for the
contrastive task and discards information a downstream classifier needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Preprocess = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Backbone features of uint8 ``images`` [N, C, H, W] in eval mode -> float [N, F] on CPU."""
    was_training = backbone.training
    backbone.eval()
    chunks = [
        backbone(preprocess(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    backbone.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def reestimate_batchnorm(
    backbone: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int = 512,
) -> None:
    """Replace BN running statistics by their exact average over ``images``.

    A randomly initialised network's BN layers hold mean 0 / variance 1, which wrecks its
    features; re-estimating them on the training images is the fair random-encoder baseline.
    """
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    was_training = backbone.training
    backbone.train()
    for i in range(0, len(images), batch_size):
        backbone(preprocess(images[i : i + batch_size].to(device)))
    backbone.train(was_training)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    T: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 accuracy (%) with cosine similarity (Wu et al. 2018, eq. 8).

    Each of the k nearest training samples votes for its class with weight exp(s / T).
    ``k`` is capped by the training-set size.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_features))
    train = F.normalize(train_features, dim=1)
    correct = 0
    for start in range(0, len(test_features), chunk):
        query = F.normalize(test_features[start : start + chunk], dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)  # [Q, k]
        weights = (sims / T).exp()
        votes = torch.zeros(len(query), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return 100.0 * correct / len(test_features)


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 (%) of a softmax classifier trained full-batch with L-BFGS on frozen features.

    Features are standardised with the training statistics. L-BFGS on the full batch converges in
    a hundred iterations on these sizes and, unlike SGD, needs no learning-rate tuning.
    """
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).double()
    x_test = ((test_features - mean) / std).double()
    num_classes = int(train_labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x_train.shape[1], num_classes, generator=generator) * 0.01).double()
    weight.requires_grad_(True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=epochs, history_size=20)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, train_labels)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (x_test @ weight + bias).argmax(1)
    return 100.0 * float((predictions == test_labels).float().mean())
