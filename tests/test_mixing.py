"""MoCHi's synthetic negatives against the construction of Kalantidis et al. 2020."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import unit

from cltool.losses import info_nce
from cltool.mixing import mochi_mix, mochi_negatives

TOL = 1e-9


pytestmark = pytest.mark.usefixtures("float64")


def hardest(q: list[float], negatives: list[list[float]], count: int) -> set[int]:
    """Indices of the ``count`` negatives with the largest q·n, by sorting."""
    scores = [sum(a * b for a, b in zip(q, n, strict=True)) for n in negatives]
    return set(sorted(range(len(negatives)), key=lambda j: -scores[j])[:count])


def normalised(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_mixes_follow_the_construction() -> None:
    N, K, D, n_hard, s, s_prime = 4, 20, 5, 6, 7, 3
    q, negatives = unit(N, D, 0), unit(K, D, 1)
    mix = mochi_mix(q, negatives, n_hard, s, s_prime, torch.Generator().manual_seed(0))
    assert mix.negatives.shape == (N, s + s_prime, D)
    assert torch.allclose(mix.negatives.norm(dim=2), torch.ones(N, s + s_prime), atol=TOL)
    assert ((mix.alpha >= 0) & (mix.alpha < 1)).all()
    assert ((mix.beta >= 0) & (mix.beta < 0.5)).all()
    Q, Nl = q.tolist(), negatives.tolist()
    for i in range(N):
        top = hardest(Q[i], Nl, n_hard)
        for t in range(s):
            a, b = mix.pair_indices[i, t].tolist()
            assert {a, b} <= top  # both sources among the hardest negatives of this query
            alpha = mix.alpha[i, t].item()
            h = normalised([alpha * x + (1 - alpha) * y for x, y in zip(Nl[a], Nl[b], strict=True)])
            assert mix.negatives[i, t].tolist() == pytest.approx(h, abs=TOL)
        for t in range(s_prime):
            j = mix.query_indices[i, t].item()
            assert j in top
            beta = mix.beta[i, t].item()
            h = normalised([beta * x + (1 - beta) * y for x, y in zip(Q[i], Nl[j], strict=True)])
            assert mix.negatives[i, s + t].tolist() == pytest.approx(h, abs=TOL)


def test_no_gradient_through_synthetic_points() -> None:
    q = unit(3, 4, 2).requires_grad_(True)
    negatives = unit(10, 4, 3)
    synthetic = mochi_negatives(q, negatives, 5, 4, 2, torch.Generator().manual_seed(1))
    assert not synthetic.requires_grad
    k = unit(3, 4, 4)
    info_nce(q, k, negatives, 0.2, extra_negatives=synthetic).backward()
    assert q.grad is not None


def test_deterministic_given_the_generator() -> None:
    q, negatives = unit(5, 4, 5), unit(12, 4, 6)
    a = mochi_negatives(q, negatives, 4, 3, 2, torch.Generator().manual_seed(7))
    b = mochi_negatives(q, negatives, 4, 3, 2, torch.Generator().manual_seed(7))
    c = mochi_negatives(q, negatives, 4, 3, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_n_hard_is_capped_at_queue_size_and_counts_may_be_zero() -> None:
    q, negatives = unit(3, 4, 9), unit(4, 4, 10)
    mix = mochi_mix(q, negatives, 100, 5, 0, torch.Generator().manual_seed(0))
    assert mix.negatives.shape == (3, 5, 4)
    assert mix.pair_indices.max() < 4
    assert mix.query_indices.shape == (3, 0)
    assert mochi_negatives(q, negatives, 2, 0, 3).shape == (3, 3, 4)


def test_single_hardest_negative_mixes_with_itself() -> None:
    q, negatives = unit(2, 3, 11), unit(6, 3, 12)
    mix = mochi_mix(q, negatives, 1, 2, 0, torch.Generator().manual_seed(0))
    top1 = (q @ negatives.T).argmax(dim=1)
    assert torch.equal(mix.pair_indices, top1[:, None, None].expand(2, 2, 2))
    assert torch.allclose(mix.negatives, negatives[top1][:, None].expand(2, 2, 3), atol=TOL)


def test_empty_queue_is_rejected() -> None:
    with pytest.raises(ValueError):
        mochi_negatives(unit(2, 3, 0), torch.zeros(0, 3), 4, 1, 1)
