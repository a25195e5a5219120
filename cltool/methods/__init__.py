"""Contrastive methods, assembled from the recipe's slots.

Every method is a ``torch.nn.Module`` with

- ``training_loss(view_q, view_k, indices, labels, progress) -> (loss, logs)``: one step's loss
  and a dict of scalar tensors to log (read back only every few steps, so no host sync per step);
- ``forward(...)``: ``training_loss`` itself, the entry point DistributedDataParallel wraps;
- ``end_step()``: called after the optimiser step (memory updates that the backward pass must
  not see happen here);
- ``backbone``: the module whose features evaluation uses;
- ``query_encoder``: the :class:`~cltool.nets.Encoder` (backbone and head) that stages start
  from;
- ``on_epoch_start(epoch, trainer)``: called before an epoch's first step (never on a resume
  inside an epoch), for work over the whole data set such as SpCL's clustering;
- all memory (queue, bank, pointer) in registered buffers, so ``state_dict()`` is the checkpoint.

Methods derive from :class:`Method`, which supplies the hooks they do not need as no-ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from cltool.recipe import Recipe

if TYPE_CHECKING:
    from cltool.train import Trainer


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


class Method(nn.Module):
    """Base of every method: the hooks of the loop that a method may leave out."""

    def forward(self, *step: object) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's loss: DistributedDataParallel hooks its gradient averaging into a
        module's forward, so the training loss is reached through it."""
        return self.training_loss(*step)

    @property
    def query_encoder(self) -> nn.Module:
        """The encoder the loss trains with gradients, whose weights stages start from; the
        methods with one shared encoder call it ``encoder`` (MoCo's family: ``encoder_q``)."""
        return self.encoder

    def end_step(self) -> None:
        """Memory updates after the optimiser step; none by default."""

    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        """Whole-data-set work before the epoch's first step; none by default."""


def build_method(recipe: Recipe, in_channels: int, num_train: int, num_classes: int) -> Method:
    """The recipe's method; memories sized by the data set are sized by ``num_train`` images
    of ``num_classes`` classes."""
    from cltool.methods.instdisc import InstDisc
    from cltool.methods.moco import MoCo
    from cltool.methods.mocov3 import MoCoV3
    from cltool.methods.simclr import SimCLR, SupCon
    from cltool.methods.spcl import SpCL
    from cltool.methods.xbm import XBM

    builders: dict[str, Callable[[], Method]] = {
        "moco": lambda: MoCo(recipe, in_channels),
        "mocov3": lambda: MoCoV3(recipe, in_channels),
        "simclr": lambda: SimCLR(recipe, in_channels),
        "supcon": lambda: SupCon(recipe, in_channels),
        "instdisc": lambda: InstDisc(recipe, in_channels, num_train),
        "xbm": lambda: XBM(recipe, in_channels),
        "spcl": lambda: SpCL(recipe, in_channels, num_train, num_classes),
    }
    return builders[recipe.method]()
