"""The k-reciprocal Jaccard distance against a plain loop over Zhong et al. (2017)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cltool.kreciprocal import jaccard_distance
from cltool.methods.spcl import reliable_clusters
from cltool.recipe import SpclConfig
from tests.helpers import unit


def naive_jaccard(x: list[list[float]], k1: int, k2: int) -> list[list[float]]:
    """Sets and loops, one line of the paper each; Σ max taken as it is, not as 2 - Σ min."""
    n = len(x)
    d = [[2 - 2 * sum(a * b for a, b in zip(x[i], x[j], strict=True)) for j in range(n)]
         for i in range(n)]  # fmt: skip
    rank = [sorted(range(n), key=lambda j, i=i: (j != i, d[i][j])) for i in range(n)]

    def reciprocal(i: int, k: int) -> set[int]:
        return {j for j in rank[i][: k + 1] if i in rank[j][: k + 1]}

    encodings = []
    for i in range(n):
        neighbours = reciprocal(i, k1)
        expanded = set(neighbours)
        for candidate in neighbours:
            theirs = reciprocal(candidate, round(k1 / 2))
            if len(theirs & neighbours) > 2 / 3 * len(theirs):
                expanded |= theirs
        total = sum(math.exp(-d[i][j]) for j in expanded)
        encodings.append({j: math.exp(-d[i][j]) / total for j in expanded})
    if k2 > 1:
        encodings = [
            {
                k: sum(encodings[j].get(k, 0.0) for j in rank[i][:k2]) / k2
                for k in set().union(*(encodings[j] for j in rank[i][:k2]))
            }
            for i in range(n)
        ]
    distance = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            keys = set(encodings[i]) | set(encodings[j])
            low = sum(min(encodings[i].get(k, 0.0), encodings[j].get(k, 0.0)) for k in keys)
            high = sum(max(encodings[i].get(k, 0.0), encodings[j].get(k, 0.0)) for k in keys)
            distance[i][j] = 0.0 if i == j else 1 - low / high
    return distance


@pytest.mark.parametrize(("k1", "k2"), [(6, 3), (8, 1), (4, 4)])
def test_jaccard_distance_matches_the_paper_loop(k1: int, k2: int) -> None:
    # three loose groups, so that expansions and shared neighbourhoods really occur
    x = unit(45, 6, seed=1) * 0.4 + unit(3, 6, seed=2).repeat_interleave(15, 0)
    x = torch.nn.functional.normalize(x.double(), dim=1)
    expected = naive_jaccard(x.tolist(), k1, k2)
    np.testing.assert_allclose(jaccard_distance(x, k1, k2), expected, atol=1e-12)


def test_images_sharing_no_neighbour_are_at_distance_one() -> None:
    blobs = unit(2, 16, seed=0).repeat_interleave(20, 0) + 0.05 * unit(40, 16, seed=3)
    distance = jaccard_distance(torch.nn.functional.normalize(blobs, dim=1), k1=8, k2=3)
    assert (distance[:20, 20:] == 1).all()
    nearest = np.where(np.eye(40, dtype=bool), np.inf, distance).min(axis=1)
    assert nearest.max() < 0.7  # everyone has a close neighbour, in its own blob
    np.testing.assert_array_equal(distance, distance.T)


def test_reliable_clusters_on_jaccard_distance_find_the_blobs() -> None:
    blobs = unit(3, 16, seed=0).repeat_interleave(30, 0) + 0.05 * unit(90, 16, seed=4)
    features = torch.nn.functional.normalize(blobs, dim=1)
    thresholds = torch.full((2,), float("nan"), dtype=torch.float64)
    config = SpclConfig(k1=20, k2=3, reliability_quantile=0.0)
    labels = reliable_clusters(features, config, thresholds)
    assert [len(set(labels[i : i + 30])) for i in (0, 30, 60)] == [1, 1, 1]
    assert len(set(labels)) == 3 and (labels >= 0).all()
