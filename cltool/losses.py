"""Contrastive and metric-learning losses as small pure functions.

Tensors in, a scalar tensor out (the mean over anchors or pairs). Conventions:

* ``T`` is a softmax temperature; logits called "unscaled" are plain dot products.
* Masks are bool with True meaning "this entry takes part", except ``negative_mask`` of
  :func:`info_nce_logits`, which marks negatives to *remove*.
* Metric-learning losses accept an optional reference set ``(ref_emb, ref_labels)`` for
  Cross-Batch Memory (Wang et al. 2020): every anchor of the batch is paired with the candidates
  batch ∪ reference, never with itself. Pass the memory's contents from *before* the current
  batch is enqueued, or an anchor meets its own detached copy as a positive at distance 0.
* When no valid pair/triplet exists the loss is a zero that still depends on the inputs, so
  ``backward()`` works and gives zero gradients.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# helpers


def _zero(x: Tensor) -> Tensor:
    """A scalar 0 connected to ``x``'s graph."""
    return (x * 0).sum()


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """log Σ_{mask} exp(x) over the last dim; -inf for rows with no entry.

    Empty rows are computed on zeros and then replaced, so their gradient is 0 instead of the NaN
    that ``logsumexp`` of an all -inf row back-propagates.
    """
    empty = ~mask.any(dim=-1, keepdim=True)
    x = x.masked_fill(~mask, -math.inf).masked_fill(empty, 0.0)
    return torch.logsumexp(x, dim=-1).masked_fill(empty.squeeze(-1), -math.inf)


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [A, B] via ‖a‖² + ‖b‖² - 2a·b, with a zero-safe square root.

    Exactly-zero distances get value 0 and gradient 0 instead of the infinite slope of √ at 0.
    """
    squared = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)
    nonzero = squared > 0
    return torch.where(nonzero, torch.where(nonzero, squared, 1.0).sqrt(), 0.0)


def _pair_sets(
    emb: Tensor, labels: Tensor, ref_emb: Tensor | None, ref_labels: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Candidates [M, D] = batch ∪ reference, their labels [M], positive and negative masks [B, M].

    The positive mask excludes each anchor paired with itself (the diagonal of the batch block).
    """
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    candidates, candidate_labels = emb, labels
    if ref_emb is not None and ref_labels is not None:
        candidates = torch.cat([emb, ref_emb.to(emb.dtype)])
        candidate_labels = torch.cat([labels, ref_labels])
    same = labels[:, None] == candidate_labels[None, :]  # [B, M]
    itself = torch.eye(*same.shape, dtype=torch.bool, device=emb.device)
    return candidates, candidate_labels, same & ~itself, ~same


# --------------------------------------------------------------------------------------------
# InfoNCE family


def info_nce_logits(
    q: Tensor,
    k: Tensor,
    negatives: Tensor,
    extra_negatives: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """Unscaled logits [N, 1 + K (+ S)] of MoCo's InfoNCE, the positive in column 0.

    ``q``, ``k`` [N, D] are L2-normalised queries and their positive keys, ``negatives`` [K, D]
    the shared queue. ``extra_negatives`` [N, S, D] are per-query negatives (MoCHi's synthetic
    hard negatives), appended after the queue. ``negative_mask`` [N, K] (True = remove) sets
    queue logits to -inf, e.g. to drop a sample's own stale keys.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = q @ negatives.T  # [N, K]
    if negative_mask is not None:
        l_neg = l_neg.masked_fill(negative_mask, -math.inf)
    parts = [l_pos, l_neg]
    if extra_negatives is not None:
        parts.append(torch.einsum("nd,nsd->ns", q, extra_negatives))  # [N, S]
    return torch.cat(parts, dim=1)


def cross_entropy_first(logits: Tensor, T: float) -> Tensor:
    """Cross-entropy of ``logits / T`` [N, C] with target class 0 for every row.

    InfoNCE (Oord et al. 2018) written as a (1+K)-way classification of the positive.
    """
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits / T, targets)


def info_nce(
    q: Tensor,
    k: Tensor,
    negatives: Tensor,
    T: float,
    extra_negatives: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """MoCo's InfoNCE L_q = -log exp(q·k+/T) / Σ_i exp(q·k_i/T) (He et al. 2020, Eq. 1).

    See :func:`info_nce_logits` for the arguments.
    """
    return cross_entropy_first(info_nce_logits(q, k, negatives, extra_negatives, negative_mask), T)


def nt_xent(z1: Tensor, z2: Tensor, T: float) -> Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1), averaged over all 2N anchors.

    ``z1``, ``z2`` [N, D] are the projections of two views; similarities are cosine, as in the
    paper. Each anchor's positive is its other view and the remaining 2N - 2 views are negatives.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, D]
    itself = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / T).masked_fill(itself, -math.inf)  # [2N, 2N]
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def supcon(
    features: Tensor, labels: Tensor | None = None, T: float = 0.07, base_T: float = 0.07
) -> Tensor:
    """Supervised contrastive loss L_out (Khosla et al. 2020, Eq. 2).

    ``features`` [N, V, D] holds V views per sample (normalised here, as in the paper). Every
    view is an anchor; its positives P(i) are all other views with the same label, and

        L = -(T / base_T) · mean_i 1/|P(i)| Σ_{p∈P(i)} log exp(z_i·z_p/T) / Σ_{a≠i} exp(z_i·z_a/T).

    Anchors with no positive (a class with one sample and V = 1) are left out of the mean.
    ``labels=None`` makes each sample its own class, which is SimCLR's loss for V = 2.
    """
    n, views, _ = features.shape
    z = F.normalize(features, dim=2).transpose(0, 1).reshape(views * n, -1)  # [V·N, D]
    labels = torch.arange(n, device=features.device) if labels is None else labels
    anchor_labels = labels.repeat(views)  # [V·N], view-major like z
    itself = torch.eye(views * n, dtype=torch.bool, device=z.device)
    logits = z @ z.T / T  # [V·N, V·N]
    log_prob = logits - _masked_logsumexp(logits, ~itself)[:, None]
    positives = (anchor_labels[:, None] == anchor_labels[None, :]) & ~itself
    num_positives = positives.sum(dim=1)
    has_positive = num_positives > 0
    if not has_positive.any():
        return _zero(features)
    mean_log_prob = (
        log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_positive]
        / (num_positives[has_positive])
    )
    return -(T / base_T) * mean_log_prob.mean()


# --------------------------------------------------------------------------------------------
# InstDisc


def estimate_Z(logits: Tensor, T: float, n: int) -> float:
    """InstDisc's normalising constant Z ≈ n · mean_j exp(v_j·f/T) (Wu et al. 2018, §3.2).

    ``logits`` are unscaled similarities between batch features and sampled bank entries (any
    shape). The paper estimates Z once, in the first iteration, and keeps it fixed: the caller
    holds the returned value.
    """
    return n * torch.exp(logits.detach() / T).mean().item()


def nce_loss(pos_logits: Tensor, noise_logits: Tensor, T: float, n: int, Z: float) -> Tensor:
    """InstDisc's NCE loss (Wu et al. 2018, Eq. 5-6), averaged over the batch.

    With P(i|v) = exp(v_i·f/T)/Z and K noise samples from Pn = 1/n, the posterior that an entry
    comes from the data is h(i, v) = P(i|v) / (P(i|v) + K·Pn) and

        L = -log h(positive) - Σ_noise log(1 - h(noise)).

    h = σ(x) with x = v·f/T - log(Z·K/n), so the two terms are softplus(-x) and softplus(x),
    which stay finite where the ratio form overflows. ``pos_logits`` [B] and ``noise_logits``
    [B, K] are unscaled similarities to the sample's own and to noise bank entries.
    """
    shift = math.log(Z * noise_logits.shape[1] / n)
    x_pos = pos_logits / T - shift  # [B]
    x_noise = noise_logits / T - shift  # [B, K]
    return (F.softplus(-x_pos) + F.softplus(x_noise).sum(dim=1)).mean()


def instance_softmax(f: Tensor, bank: Tensor, indices: Tensor, T: float) -> Tensor:
    """InstDisc's full non-parametric softmax (Wu et al. 2018, Eq. 2) over all n bank entries.

    ``f`` [B, D] normalised features of samples ``indices`` [B]; ``bank`` [n, D]. Exact but
    O(n) per sample; :func:`nce_loss` is the paper's approximation.
    """
    return F.cross_entropy(f @ bank.T / T, indices)


# --------------------------------------------------------------------------------------------
# metric learning


def contrastive_loss(
    emb: Tensor,
    labels: Tensor,
    margin: float,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006) in its Euclidean form, mean over all pairs.

    A positive pair costs d², a negative pair relu(margin - d)², d the Euclidean distance
    between the embeddings as given (normalise them first for a margin in [0, 2]). The paper's
    factor ½ is dropped.
    """
    candidates, _, positive, negative = _pair_sets(emb, labels, ref_emb, ref_labels)
    d = _distances(emb, candidates)  # [B, M]
    per_pair = torch.where(positive, d**2, F.relu(margin - d) ** 2)
    valid = positive | negative
    if not valid.any():
        return _zero(emb)
    return per_pair[valid].mean()


def triplet_loss(
    emb: Tensor,
    labels: Tensor,
    margin: float,
    mining: Literal["all", "hard", "semihard"] = "all",
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Tensor:
    """Triplet loss relu(d(a,p) - d(a,n) + margin) (Schroff et al. 2015), Euclidean d.

    ``mining`` picks the triplets averaged over:

    * ``"all"``: every (a, p, n), the zero ones included.
    * ``"hard"``: per anchor its farthest positive and nearest negative (Hermans et al. 2017).
    * ``"semihard"``: per (a, p) the nearest negative with d(a,p) < d(a,n) < d(a,p) + margin,
      FaceNet's semi-hard negatives; pairs without one are skipped.

    No mining builds the [B, M, M] cube of triplets (a cross-batch memory of M = 2048 made it
    tens of GB): each anchor's negative distances are sorted once, and every positive finds its
    negatives in them by binary search, in O(B·M) memory.
    """
    candidates, _, positive, negative = _pair_sets(emb, labels, ref_emb, ref_labels)
    d = _distances(emb, candidates)  # [B, M]
    if mining == "hard":
        d_ap = d.masked_fill(~positive, -math.inf).amax(dim=1)  # [B]
        d_an = d.masked_fill(~negative, math.inf).amin(dim=1)  # [B]
        valid = positive.any(dim=1) & negative.any(dim=1)
        losses = F.relu(d_ap - d_an + margin)[valid]
        return losses.mean() if losses.numel() else _zero(emb)
    if mining not in ("all", "semihard"):
        raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")
    # each anchor's negative distances, ascending, non-negatives (+inf) last
    d_an, _ = d.masked_fill(~negative, math.inf).sort(dim=1)  # [B, M]
    if mining == "all":
        # Σ_n relu(d_ap + margin - d_an) = k (d_ap + margin) - (sum of the k nearest d_an),
        # k the number of negatives nearer than d_ap + margin.
        reach = (d + margin).contiguous()  # [B, M], per (a, p)
        k = torch.searchsorted(d_an, reach)  # [B, M]
        nearest_sums = F.pad(torch.where(d_an.isfinite(), d_an, 0.0).cumsum(dim=1), (1, 0))
        per_pair = k * reach - nearest_sums.gather(1, k)  # [B, M]
        count = (positive.sum(dim=1) * negative.sum(dim=1)).sum()
        if count == 0:
            return _zero(emb)
        return per_pair[positive].sum() / count
    first_farther = torch.searchsorted(d_an, d.contiguous(), right=True)  # [B, M]
    nearest = d_an.gather(1, first_farther.clamp_max(d_an.shape[1] - 1))  # [B, M]
    semihard = (first_farther < d_an.shape[1]) & (nearest < d + margin)  # finite, in the band
    valid = positive & semihard
    losses = (d - nearest + margin)[valid]
    return losses.mean() if losses.numel() else _zero(emb)


def lifted_structure_loss(
    emb: Tensor,
    labels: Tensor,
    margin: float,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Tensor:
    """Smooth lifted structured loss (Oh Song et al. 2016, Eq. 4), Euclidean D.

    For a positive pair (i, j),
    J_ij = log(Σ_{k∈N_i} exp(α - D_ik) + Σ_{l∈N_j} exp(α - D_jl)) + D_ij with α = ``margin``,
    and L = 1/(2|P|) Σ_P relu(J_ij)². Pairs are taken ordered (anchor i in the batch, j a
    candidate), which gives the paper's value over unordered pairs; the negative sets N_i, N_j
    are drawn from all candidates, so a reference set costs O((B + M)²) distances.
    A pair neither of whose ends has a negative has J = -inf and contributes 0.
    """
    candidates, candidate_labels, positive, _ = _pair_sets(emb, labels, ref_emb, ref_labels)
    if not positive.any():
        return _zero(emb)
    batch = emb.shape[0]
    d_all = _distances(candidates, candidates)  # [M, M]
    negative_all = candidate_labels[:, None] != candidate_labels[None, :]  # [M, M]
    log_neg = _masked_logsumexp(margin - d_all, negative_all)  # [M]
    has_negative = negative_all.any(dim=1)  # [M]
    live = positive & (has_negative[:batch, None] | has_negative[None, :])  # [B, M]
    log_i = torch.where(live, log_neg[:batch, None], 0.0)  # [B, M]
    log_j = torch.where(live, log_neg[None, :], 0.0)  # [B, M]
    J = torch.logaddexp(log_i, log_j) + d_all[:batch]  # [B, M]
    return (F.relu(J) ** 2)[live].sum() / (2 * positive.sum())


def circle_loss(
    emb: Tensor,
    labels: Tensor,
    m: float,
    gamma: float,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Tensor:
    """Circle loss (Sun et al. 2020, Eq. 6) on cosine similarities, mean over anchors.

    With O_p = 1 + m, O_n = -m, Δ_p = 1 - m, Δ_n = m, α_p = relu(O_p - s_p), α_n = relu(s_n - O_n):

        L = softplus(logsumexp_n γ α_n (s_n - Δ_n) + logsumexp_p -γ α_p (s_p - Δ_p)).

    The weights α are constants for the gradient, as in the paper. Anchors without a positive or
    without a negative are left out of the mean.
    """
    candidates, _, positive, negative = _pair_sets(emb, labels, ref_emb, ref_labels)
    s = F.normalize(emb, dim=1) @ F.normalize(candidates, dim=1).T  # [B, M]
    alpha_p = F.relu(1 + m - s.detach())
    alpha_n = F.relu(s.detach() + m)
    logit_p = -gamma * alpha_p * (s - (1 - m))
    logit_n = gamma * alpha_n * (s - m)
    valid = positive.any(dim=1) & negative.any(dim=1)  # [B]
    if not valid.any():
        return _zero(emb)
    losses = F.softplus(_masked_logsumexp(logit_n, negative) + _masked_logsumexp(logit_p, positive))
    return losses[valid].mean()


# --------------------------------------------------------------------------------------------
# after pretraining: fine-tuning and distillation (SimCLR v2)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits [B, C] against labels [B], mean over the batch: fine-tuning's,
    the linear probe's and supervised training's loss."""
    return F.cross_entropy(logits, labels)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """SimCLR v2's distillation loss (eq. 2): -Σ_y P_T(y|x; T) log P_S(y|x; T), the teacher's
    softened prediction as the target, mean over the batch. The teacher gets no gradient."""
    target = F.softmax(teacher_logits.detach() / T, dim=1)
    return -(target * F.log_softmax(student_logits / T, dim=1)).sum(1).mean()
