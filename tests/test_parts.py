"""The parts methods share: how two views pass through one encoder, and the optimiser."""

from __future__ import annotations

import torch
from torch import nn

from cltool.methods.parts import encode_views
from cltool.nets import Encoder
from cltool.recipe import ModelConfig, Recipe
from cltool.train import build_optimizer


def batchnorm_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).train()


def test_separate_views_normalise_each_view_with_its_own_statistics() -> None:
    """A view shifted by a constant comes out of a Linear-BN encoder unchanged when each view
    has its own statistics, and changed when both views share them."""
    encoder = batchnorm_encoder()
    view = torch.randn(16, 6, dtype=torch.float64)
    shifted = view + 3.0
    encoder.double()
    first, second = encode_views(encoder, view, shifted, "separate")
    torch.testing.assert_close(first, second)
    first, second = encode_views(encoder, view, shifted, "joint")
    assert (first - second).abs().max() > 0.1
    joint = encoder(torch.cat([view, shifted]))
    torch.testing.assert_close(torch.cat([first, second]), joint)


def test_fused_sgd_takes_the_default_sgd_steps_to_round_off() -> None:
    """The trainer's fused optimiser takes the default multi-tensor SGD's steps (to float
    round-off: the fused kernel may contract a multiply-add)."""
    recipe = Recipe()
    torch.manual_seed(0)
    reference = Encoder(ModelConfig(width=4, head_hidden=16, dim=8), 3)
    fused = Encoder(ModelConfig(width=4, head_hidden=16, dim=8), 3)
    fused.load_state_dict(reference.state_dict())
    optimizers = {
        "fused": build_optimizer(recipe, list(fused.parameters()), torch.device("cpu")),
        "foreach": torch.optim.SGD(
            reference.parameters(),
            lr=recipe.optim.lr,
            momentum=recipe.optim.momentum,
            weight_decay=recipe.optim.weight_decay,
        ),
    }
    assert optimizers["fused"].defaults["fused"]
    for step in range(4):
        images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        for name, encoder in (("fused", fused), ("foreach", reference)):
            optimizers[name].zero_grad()
            encoder(images).square().sum().backward()
            optimizers[name].step()
    for a, b in zip(fused.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
