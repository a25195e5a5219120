"""The labelled subsets of the semi-supervised protocol: which training images keep a label.

A subset is a pure function of the training labels, the fraction and a seed of its own
(``stages.subset_seed``), never of the method, the run or its training seed: every method and
every run of a sweep fine-tunes on the same images, so their numbers compare. It is
class-balanced (stratified): each class keeps ``fraction * its size`` images, rounded to the
nearest whole image, so a class is never left out by chance and the subset is the fraction
asked for, to a rounding per class; a fraction that would leave a class out is refused in one
line. Within a class the images come in one seeded order, so the subset of a smaller fraction
is inside the subset of a larger one (the 1% images are among the 10%).

Numpy only: the runner half checks fractions without torch.
"""

from __future__ import annotations

import math

import numpy as np

from cltool.errors import InputError


def class_counts(labels: np.ndarray, fraction: float) -> dict[int, int]:
    """Images kept per class at ``fraction``: ``fraction * class size``, halves rounded up."""
    classes, sizes = np.unique(labels, return_counts=True)
    # A hair over the product, so that 0.1 * 485 is 49 (48.5 rounded up), not 48.
    return {
        int(c): math.floor(fraction * int(n) + 0.5 + 1e-9)
        for c, n in zip(classes, sizes, strict=True)
    }


def minimum_fraction(labels: np.ndarray) -> float:
    """The smallest fraction that keeps an image of every class: half an image of the smallest
    class, rounded up to one."""
    return 0.5 / int(np.unique(labels, return_counts=True)[1].min())


def check_fraction(labels: np.ndarray, fraction: float, source: str) -> None:
    """Refuse a fraction outside (0, 1] or one that leaves a class without a labelled image."""
    if not 0 < fraction <= 1:
        raise InputError(
            f"{source}: label fraction {fraction} is outside (0, 1]: give a share of the "
            "training images, e.g. 0.01 for 1%"
        )
    counts = class_counts(labels, fraction)
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        least = minimum_fraction(labels)
        raise InputError(
            f"{source}: label fraction {fraction} leaves class {empty[0]} without a labelled "
            f"image ({len(labels)} training images, the smallest class has "
            f"{round(0.5 / least)}): the smallest fraction that labels every class is "
            f"{_round_up(least)}"
        )


def _round_up(x: float) -> float:
    """``x`` rounded up to 3 significant digits, so that the value said is enough."""
    digits = 2 - math.floor(math.log10(x))
    return math.ceil(x * 10**digits - 1e-9) / 10**digits


def labelled_subset(labels: np.ndarray, fraction: float, subset_seed: int) -> np.ndarray:
    """Sorted indices into ``labels`` of the images that keep their label at ``fraction``."""
    kept = []
    for cls, count in class_counts(labels, fraction).items():
        members = np.flatnonzero(labels == cls)
        order = np.random.default_rng([subset_seed % 2**32, cls]).permutation(len(members))
        kept.append(members[order[:count]])
    return np.sort(np.concatenate(kept))
