"""Parts several methods share: the encoder with an optional deeper head, the network that
evaluation reads, and the in-batch InfoNCE with its similarity logs."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cltool.nets import Encoder, projection_head
from cltool.recipe import ModelConfig


def hidden_layer(in_dim: int, out_dim: int, bn: bool) -> nn.Sequential:
    """Linear(-BN)-ReLU: one hidden layer of an MLP head."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


def build_encoder(cfg: ModelConfig, in_channels: int) -> Encoder:
    """An :class:`Encoder` whose MLP head has ``cfg.head_layers`` linear layers.

    SimCLR v2 found a deeper (3-layer) projection head helps, and that features taken from its
    first layer evaluate better than the backbone's. Extra layers are hidden layers placed before
    the usual two-layer head, so ``head[:j]`` is the first j hidden layers.
    """
    encoder = Encoder(cfg, in_channels)
    extra = cfg.head_layers - 2
    if extra > 0:
        widths = [encoder.feature_dim] + [cfg.head_hidden] * extra
        hidden = [hidden_layer(a, b, cfg.head_bn) for a, b in itertools.pairwise(widths)]
        last = projection_head(cfg.head, cfg.head_hidden, cfg.head_hidden, cfg.dim, cfg.head_bn)
        encoder.head = nn.Sequential(*hidden, last)
    return encoder


def evaluation_network(encoder: Encoder, keep_head_layers: int) -> nn.Module:
    """The backbone, followed by the first ``keep_head_layers`` hidden head layers (SimCLR v2's
    "fine-tune from the middle of the head"), as the module evaluation extracts features with."""
    if keep_head_layers == 0:
        return encoder.backbone
    return nn.Sequential(encoder.backbone, *encoder.head[:keep_head_layers])


def encode_views(
    encode: Callable[[torch.Tensor], torch.Tensor],
    view_q: torch.Tensor,
    view_k: torch.Tensor,
    how: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views [B, ...] through one encoder, as ``model.encode_views`` says: ``"joint"`` is
    one pass over the 2B images, so BatchNorm normalises with statistics of both views (SimCLR's
    global BN); ``"separate"`` is a pass per view, statistics per view (MoCo v3's code, lightly,
    solo-learn). On a 2-core CPU two passes of 128 images took 7-15% less time than one of 256
    (ResNet-18, benchmarks/results/step_separate_idle.md)."""
    if how == "separate":
        return encode(view_q), encode(view_k)
    first, second = encode(torch.cat([view_q, view_k])).chunk(2)
    return first, second


def in_batch_info_nce(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE with the batch's other keys as negatives: q_i's positive is k_i.

    ``q``, ``k`` [B, dim] are L2-normalised.
    """
    logits = q @ k.T / T  # [B, B]
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


@torch.no_grad()
def pair_similarities(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cosine of the positive pairs (q_i, k_i) and of all other pairs (q_i, k_j), j != i:
    the two numbers MoCo logs, so every method's step records read alike."""
    sims = q @ k.T  # [B, B]
    positive = sims.diagonal().sum()
    negatives = (sims.sum() - positive) / (len(q) * (len(q) - 1))
    return {"pos_sim": positive / len(q), "neg_sim": negatives}
