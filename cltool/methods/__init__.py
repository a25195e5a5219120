"""Contrastive methods, assembled from the recipe's slots.

Every method is a ``torch.nn.Module`` with

- ``training_loss(view_q, view_k, indices, labels, progress) -> (loss, logs)``: one step's loss
  and a dict of scalar tensors to log (read back only every few steps, so no host sync per step);
- ``end_step()``: called after the optimiser step (memory updates that the backward pass must
  not see happen here);
- ``backbone``: the module whose features evaluation uses;
- all memory (queue, bank, pointer) in registered buffers, so ``state_dict()`` is the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cltool.recipe import Recipe


@dataclass(frozen=True)
class Progress:
    """Where training stands, for schedules (momentum, mixing start) inside a method."""

    epoch: int
    global_step: int
    total_steps: int
    seed: int  # distinct per step: seeds any randomness a method draws (MoCHi's mixing)

    @property
    def fraction(self) -> float:
        return self.global_step / max(1, self.total_steps)


def build_method(recipe: Recipe, in_channels: int) -> nn.Module:
    from cltool.methods.moco import MoCo

    builders = {"moco": MoCo}
    return builders[recipe.method](recipe, in_channels)
