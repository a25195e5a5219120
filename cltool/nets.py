"""Backbones and projection heads.

An :class:`Encoder` is a backbone (images -> features, the representation that evaluation uses)
followed by a projection head (features -> L2-normalised embedding, what the loss sees). MoCo v1
uses a linear head, MoCo v2 / SimCLR an MLP head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cltool.recipe import ModelConfig


def small_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """Four conv-BN-ReLU stages, each halving the resolution; fast enough for a 2-core CPU."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(4):
        out = width * 2**stage
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        ]
        if stage < 3:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


def resnet(name: str, in_channels: int, small_stem: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; the small stem is the CIFAR variant."""
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_backbone(cfg: ModelConfig, in_channels: int) -> tuple[nn.Module, int]:
    if cfg.backbone == "small_cnn":
        return small_cnn(in_channels, cfg.width)
    return resnet(cfg.backbone, in_channels, cfg.small_stem)


def projection_head(kind: str, in_dim: int, hidden: int, out_dim: int, bn: bool) -> nn.Module:
    """Linear (MoCo v1), Linear-ReLU-Linear (MoCo v2) or, with ``bn``,
    Linear-BN-ReLU-Linear-BN (as MoCo v3's projector).

    The output BatchNorm (no affine) centres the embeddings over the batch, so they cannot share
    a common direction. That matters for MoCo only when its queue starts as random unit vectors
    (``dictionary.queue_start = "random"``, MoCo's code): negatives that are isotropic noise do not
    penalise a common direction, so in the first K / B steps the encoder learns to map every
    image near one point, and the real keys that replace the noise are then all alike. Measured on
    the embedded default, seed 0, ``recipes/moco.toml``: without head BN, a random start ends at
    kNN 44.5 (negative cosine 0.87 at step 20), an empty start at 71.1; with head BN, 70.8 from a
    random start. The empty start (this project's default) uses real keys from the first step.
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns unit-norm embeddings [B, dim]."""

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(cfg, in_channels)
        self.head = projection_head(
            cfg.head, self.feature_dim, cfg.head_hidden, cfg.dim, cfg.head_bn
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)
