"""MoCHi: synthetic hard negatives by mixing (Kalantidis et al. 2020).

For each query, the hardest negatives of the queue are mixed into new, harder ones that enter
the InfoNCE denominator only: they are built without gradient, as in the paper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class MochiMix(NamedTuple):
    """Synthetic negatives and how each was made (indices into the queue, mixing weights)."""

    negatives: Tensor  # [N, s + s', D]: s pair mixes, then s' query mixes; unit norm
    pair_indices: Tensor  # [N, s, 2] queue indices (i, j) of h = α n_i + (1 - α) n_j
    alpha: Tensor  # [N, s]
    query_indices: Tensor  # [N, s'] queue index j of h' = β q + (1 - β) n_j
    beta: Tensor  # [N, s']


def _pick(hardest: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """[N, count] entries of each row of ``hardest`` [N, H], drawn uniformly with replacement."""
    device = generator.device if generator is not None else hardest.device
    picks = torch.randint(
        hardest.shape[1], (hardest.shape[0], count), generator=generator, device=device
    )
    return hardest.gather(1, picks.to(hardest.device))


def _uniform(q: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """[N, count] draws from U(0, 1) in ``q``'s dtype and device."""
    device = generator.device if generator is not None else q.device
    draws = torch.rand((q.shape[0], count), generator=generator, device=device, dtype=q.dtype)
    return draws.to(q.device)


@torch.no_grad()
def mochi_mix(
    q: Tensor,
    negatives: Tensor,
    n_hard: int,
    s: int,
    s_prime: int,
    generator: torch.Generator | None = None,
) -> MochiMix:
    """MoCHi's hard-negative mixing (Kalantidis et al. 2020, Eq. 3-4), for all queries at once.

    ``q`` [N, D] normalised queries, ``negatives`` [K, D] the normalised queue. Per query, the
    queue is ranked by q·n and the top ``n_hard`` (at most K) form the hardest set Q̃. Then

    * s points h = α n_i + (1 - α) n_j, i, j uniform in Q̃ (possibly equal), α ~ U(0, 1);
    * s' points h' = β q + (1 - β) n_j, j uniform in Q̃, β ~ U(0, 0.5), so the query never
      dominates and h' stays a negative;

    each normalised to the unit sphere. All randomness comes from ``generator``; the draws are
    made on the generator's device and moved to ``q``'s.
    """
    if negatives.shape[0] == 0 and s + s_prime > 0:
        raise ValueError("MoCHi needs at least one negative to mix")
    q = q.detach()
    hardest = (q @ negatives.T).topk(min(n_hard, negatives.shape[0]), dim=1).indices  # [N, H]
    pair_indices = torch.stack(
        [_pick(hardest, s, generator), _pick(hardest, s, generator)], dim=2
    )  # [N, s, 2]
    alpha = _uniform(q, s, generator)  # [N, s]
    query_indices = _pick(hardest, s_prime, generator)  # [N, s']
    beta = 0.5 * _uniform(q, s_prime, generator)  # [N, s']

    n_i, n_j = negatives[pair_indices[..., 0]], negatives[pair_indices[..., 1]]  # [N, s, D]
    pair_mixes = alpha[..., None] * n_i + (1 - alpha[..., None]) * n_j
    query_mixes = beta[..., None] * q[:, None, :] + (1 - beta[..., None]) * negatives[query_indices]
    mixes = F.normalize(torch.cat([pair_mixes, query_mixes], dim=1), dim=2)  # [N, s + s', D]
    return MochiMix(mixes, pair_indices, alpha, query_indices, beta)


def mochi_negatives(
    q: Tensor,
    negatives: Tensor,
    n_hard: int,
    s: int,
    s_prime: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The synthetic negatives [N, s + s', D] of :func:`mochi_mix`, detached.

    Pass them as ``extra_negatives`` to :func:`cltool.losses.info_nce`.
    """
    return mochi_mix(q, negatives, n_hard, s, s_prime, generator).negatives
