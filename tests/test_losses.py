"""Every loss against a naive reference: plain Python loops over the paper's formula."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import unit

from cltool.losses import (
    circle_loss,
    contrastive_loss,
    cross_entropy_first,
    estimate_Z,
    info_nce,
    info_nce_logits,
    instance_softmax,
    lifted_structure_loss,
    nce_loss,
    nt_xent,
    supcon,
    triplet_loss,
)

TOL = 1e-9
Vec = list[float]
Mat = list[Vec]


pytestmark = pytest.mark.usefixtures("float64")


def dot(a: Vec, b: Vec) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def dist(a: Vec, b: Vec) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def cos(a: Vec, b: Vec) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def normalised(a: Vec) -> Vec:
    norm = math.sqrt(dot(a, a))
    return [x / norm for x in a]


def log_softmax_first(logits: list[float]) -> float:
    """log exp(l_0) / Σ_i exp(l_i), by the formula."""
    return logits[0] - math.log(sum(math.exp(x) for x in logits))


def assert_zero_with_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# InfoNCE


def naive_info_nce(
    q: Mat,
    k: Mat,
    negatives: Mat,
    T: float,
    extra: list[Mat] | None = None,
    mask: list[list[bool]] | None = None,
) -> float:
    total = 0.0
    for i in range(len(q)):
        logits = [dot(q[i], k[i]) / T]
        logits += [dot(q[i], n) / T for j, n in enumerate(negatives) if not (mask and mask[i][j])]
        logits += [dot(q[i], h) / T for h in (extra[i] if extra else [])]
        total += -log_softmax_first(logits)
    return total / len(q)


def test_info_nce_matches_formula() -> None:
    q, k, negatives = unit(5, 4, 0), unit(5, 4, 1), unit(9, 4, 2)
    expected = naive_info_nce(q.tolist(), k.tolist(), negatives.tolist(), 0.2)
    assert info_nce(q, k, negatives, 0.2).item() == pytest.approx(expected, abs=TOL)
    logits = info_nce_logits(q, k, negatives)
    assert logits.shape == (5, 10)
    assert cross_entropy_first(logits, 0.2).item() == pytest.approx(expected, abs=TOL)


def test_info_nce_extra_negatives_and_mask() -> None:
    q, k, negatives = unit(4, 3, 3), unit(4, 3, 4), unit(6, 3, 5)
    extra = unit(4 * 2, 3, 6).reshape(4, 2, 3)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = mask[2, 5] = True
    expected = naive_info_nce(
        q.tolist(), k.tolist(), negatives.tolist(), 0.1, extra.tolist(), mask.tolist()
    )
    q = q.clone().requires_grad_(True)
    loss = info_nce(q, k, negatives, 0.1, extra_negatives=extra, negative_mask=mask)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert info_nce_logits(q, k, negatives, extra, mask).shape == (4, 1 + 6 + 2)
    loss.backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()


def test_info_nce_all_negatives_masked_is_zero() -> None:
    q, k, negatives = unit(2, 3, 0), unit(2, 3, 1), unit(3, 3, 2)
    loss = info_nce(q, k, negatives, 0.5, negative_mask=torch.ones(2, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=TOL)


def naive_nt_xent(z1: Mat, z2: Mat, T: float) -> float:
    z = [normalised(v) for v in z1 + z2]
    n, total = len(z1), 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(dot(z[i], z[a]) / T) for a in range(2 * n) if a != i)
        total += -math.log(math.exp(dot(z[i], z[positive]) / T) / denominator)
    return total / (2 * n)


def test_nt_xent_matches_formula() -> None:
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    expected = naive_nt_xent(z1.tolist(), z2.tolist(), 0.3)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------------------------
# SupCon


def naive_supcon(
    features: list[Mat], labels: list[int] | None, T: float, base_T: float
) -> float | None:
    """L_out of Khosla et al. Eq. 2; None when no anchor has a positive."""
    n, views = len(features), len(features[0])
    labels = list(range(n)) if labels is None else labels
    anchors = [(normalised(features[s][v]), labels[s]) for v in range(views) for s in range(n)]
    terms = []
    for i, (z_i, y_i) in enumerate(anchors):
        positives = [p for p, (_, y) in enumerate(anchors) if p != i and y == y_i]
        if not positives:
            continue
        denominator = sum(
            math.exp(dot(z_i, z_a) / T) for a, (z_a, _) in enumerate(anchors) if a != i
        )
        log_probs = [
            math.log(math.exp(dot(z_i, anchors[p][0]) / T) / denominator) for p in positives
        ]
        terms.append(-(T / base_T) * sum(log_probs) / len(positives))
    return sum(terms) / len(terms) if terms else None


@pytest.mark.parametrize(
    ("labels", "views"),
    [
        ([0, 1, 0, 2, 1, 0], 2),
        ([0, 1, 0, 2, 1, 0], 1),  # class 2 has one sample and one view: excluded anchor
        ([0, 0, 0, 0], 3),
        ([3, 1, 4, 5], 2),  # all unique: only the other views are positives
        (None, 2),
    ],
)
def test_supcon_matches_formula(labels: list[int] | None, views: int) -> None:
    g = torch.Generator().manual_seed(11)
    n = 4 if labels is None else len(labels)
    features = torch.randn(n, views, 5, generator=g)
    label_tensor = None if labels is None else torch.tensor(labels)
    expected = naive_supcon(features.tolist(), labels, 0.1, 0.07)
    assert supcon(features, label_tensor, 0.1, 0.07).item() == pytest.approx(expected, abs=TOL)


def test_supcon_without_labels_is_simclr() -> None:
    g = torch.Generator().manual_seed(12)
    features = torch.randn(6, 2, 4, generator=g)
    expected = nt_xent(features[:, 0], features[:, 1], 0.5).item()
    assert supcon(features, None, 0.5, 0.5).item() == pytest.approx(expected, abs=TOL)
    unique = supcon(features, torch.arange(10, 16), 0.5, 0.5).item()
    assert unique == pytest.approx(expected, abs=TOL)


def test_supcon_without_positives_is_zero_with_grad() -> None:
    features = torch.randn(4, 1, 3)
    assert_zero_with_grad(lambda x: supcon(x, torch.tensor([0, 1, 2, 3])), features)
    assert_zero_with_grad(lambda x: supcon(x, None), features)


# --------------------------------------------------------------------------------------------
# InstDisc


def test_nce_loss_matches_formula() -> None:
    g = torch.Generator().manual_seed(13)
    B, K, n, T = 4, 6, 50, 0.07
    f = unit(B, 8, 20)
    bank = unit(n, 8, 21)
    noise = torch.randint(0, n, (B, K), generator=g)
    pos_logits = (f * bank[:B]).sum(1)
    noise_logits = torch.einsum("bd,bkd->bk", f, bank[noise])

    sampled = torch.cat([pos_logits[:, None], noise_logits], 1).flatten().tolist()
    expected_Z = n * sum(math.exp(x / T) for x in sampled) / len(sampled)
    Z = estimate_Z(torch.cat([pos_logits[:, None], noise_logits], 1), T, n)
    assert math.isclose(Z, expected_Z, rel_tol=TOL)

    def h(logit: float) -> float:
        P = math.exp(logit / T) / Z
        return P / (P + K / n)

    total = 0.0
    for b in range(B):
        total += -math.log(h(pos_logits[b].item()))
        total += -sum(math.log(1 - h(x)) for x in noise_logits[b].tolist())
    expected = total / B
    assert nce_loss(pos_logits, noise_logits, T, n, Z).item() == pytest.approx(expected, abs=TOL)


def test_instance_softmax_matches_formula() -> None:
    f, bank = unit(3, 4, 30), unit(10, 4, 31)
    indices = torch.tensor([7, 0, 3])
    total = 0.0
    for b, i in enumerate(indices.tolist()):
        logits = [dot(f[b].tolist(), v) / 0.1 for v in bank.tolist()]
        logits = [logits[i], *logits[:i], *logits[i + 1 :]]
        total += -log_softmax_first(logits)
    expected = total / 3
    assert instance_softmax(f, bank, indices, 0.1).item() == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------------------------
# metric learning: naive pair enumeration shared by the references


def candidates(
    emb: Mat, labels: list[int], ref_emb: Mat | None, ref_labels: list[int] | None
) -> tuple[Mat, list[int], list[list[int]], list[list[int]]]:
    """(all candidates, their labels, per anchor the positive and negative candidate indices)."""
    cand, cand_labels = emb + (ref_emb or []), labels + (ref_labels or [])
    positives = [
        [j for j in range(len(cand)) if j != i and cand_labels[j] == labels[i]]
        for i in range(len(emb))
    ]
    negatives = [
        [j for j in range(len(cand)) if cand_labels[j] != labels[i]] for i in range(len(emb))
    ]
    return cand, cand_labels, positives, negatives


def naive_contrastive(
    emb: Mat,
    labels: list[int],
    margin: float,
    ref_emb: Mat | None = None,
    ref_labels: list[int] | None = None,
) -> float:
    cand, _, positives, negatives = candidates(emb, labels, ref_emb, ref_labels)
    terms = []
    for i, a in enumerate(emb):
        terms += [dist(a, cand[p]) ** 2 for p in positives[i]]
        terms += [max(0.0, margin - dist(a, cand[n])) ** 2 for n in negatives[i]]
    return sum(terms) / len(terms)


def naive_triplet(
    emb: Mat,
    labels: list[int],
    margin: float,
    mining: str,
    ref_emb: Mat | None = None,
    ref_labels: list[int] | None = None,
) -> float:
    cand, _, positives, negatives = candidates(emb, labels, ref_emb, ref_labels)
    terms = []
    for i, a in enumerate(emb):
        d_p = {p: dist(a, cand[p]) for p in positives[i]}
        d_n = {n: dist(a, cand[n]) for n in negatives[i]}
        if mining == "all":
            terms += [max(0.0, dp - dn + margin) for dp in d_p.values() for dn in d_n.values()]
        elif mining == "hard" and d_p and d_n:
            terms.append(max(0.0, max(d_p.values()) - min(d_n.values()) + margin))
        elif mining == "semihard":
            for dp in d_p.values():
                semihard = [dn for dn in d_n.values() if dp < dn < dp + margin]
                if semihard:
                    terms.append(dp - min(semihard) + margin)
    return sum(terms) / len(terms) if terms else 0.0


def naive_lifted(
    emb: Mat,
    labels: list[int],
    alpha: float,
    ref_emb: Mat | None = None,
    ref_labels: list[int] | None = None,
) -> float:
    """Ordered pairs (anchor i, candidate j), negatives of both ends among all candidates."""
    cand, cand_labels, positives, _ = candidates(emb, labels, ref_emb, ref_labels)

    def negative_sum(r: int) -> float:
        return sum(
            math.exp(alpha - dist(cand[r], cand[k]))
            for k in range(len(cand))
            if cand_labels[k] != cand_labels[r]
        )

    total, pairs = 0.0, 0
    for i in range(len(emb)):
        for j in positives[i]:
            pairs += 1
            s = negative_sum(i) + negative_sum(j)
            if s > 0:
                total += max(0.0, math.log(s) + dist(cand[i], cand[j])) ** 2
    return total / (2 * pairs)


def naive_lifted_paper(emb: Mat, labels: list[int], alpha: float) -> float:
    """Oh Song et al. Eq. 4 verbatim: unordered positive pairs i < j within the batch."""
    n = len(emb)
    D = [[dist(emb[i], emb[j]) for j in range(n)] for i in range(n)]
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                continue
            pairs += 1
            s = sum(math.exp(alpha - D[i][k]) for k in range(n) if labels[k] != labels[i])
            s += sum(math.exp(alpha - D[j][k]) for k in range(n) if labels[k] != labels[j])
            total += max(0.0, math.log(s) + D[i][j]) ** 2
    return total / (2 * pairs)


def naive_circle(
    emb: Mat,
    labels: list[int],
    m: float,
    gamma: float,
    ref_emb: Mat | None = None,
    ref_labels: list[int] | None = None,
) -> float:
    cand, _, positives, negatives = candidates(emb, labels, ref_emb, ref_labels)
    terms = []
    for i, a in enumerate(emb):
        if not positives[i] or not negatives[i]:
            continue
        sum_n = 0.0
        for n in negatives[i]:
            s_n = cos(a, cand[n])
            sum_n += math.exp(gamma * max(0.0, s_n + m) * (s_n - m))
        sum_p = 0.0
        for p in positives[i]:
            s_p = cos(a, cand[p])
            sum_p += math.exp(-gamma * max(0.0, 1 + m - s_p) * (s_p - (1 - m)))
        terms.append(math.log(1 + sum_n * sum_p))
    return sum(terms) / len(terms)


def batch(
    seed: int, size: int = 8, classes: int = 3, dim: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, dim, generator=g), torch.randint(0, classes, (size,), generator=g)


METRIC_CASES = [
    ("contrastive", lambda e, y, **r: contrastive_loss(e, y, 1.5, **r)),
    ("triplet-all", lambda e, y, **r: triplet_loss(e, y, 1.0, "all", **r)),
    ("triplet-hard", lambda e, y, **r: triplet_loss(e, y, 1.0, "hard", **r)),
    ("triplet-semihard", lambda e, y, **r: triplet_loss(e, y, 1.0, "semihard", **r)),
    ("lifted", lambda e, y, **r: lifted_structure_loss(e, y, 1.0, **r)),
    ("circle", lambda e, y, **r: circle_loss(e, y, 0.25, 32.0, **r)),
]


def naive_metric(
    name: str,
    emb: Mat,
    labels: list[int],
    ref_emb: Mat | None = None,
    ref_labels: list[int] | None = None,
) -> float:
    if name == "contrastive":
        return naive_contrastive(emb, labels, 1.5, ref_emb, ref_labels)
    if name.startswith("triplet"):
        return naive_triplet(emb, labels, 1.0, name.split("-")[1], ref_emb, ref_labels)
    if name == "lifted":
        return naive_lifted(emb, labels, 1.0, ref_emb, ref_labels)
    return naive_circle(emb, labels, 0.25, 32.0, ref_emb, ref_labels)


@pytest.mark.parametrize("case", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_loss_matches_formula(case, seed: int) -> None:
    name, loss_fn = case
    emb, labels = batch(seed)
    expected = naive_metric(name, emb.tolist(), labels.tolist())
    assert expected > 0
    assert loss_fn(emb, labels).item() == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("case", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_metric_loss_with_cross_batch_memory(case) -> None:
    name, loss_fn = case
    emb, labels = batch(3, size=5)
    ref_emb, ref_labels = batch(4, size=7)
    expected = naive_metric(
        name, emb.tolist(), labels.tolist(), ref_emb.tolist(), ref_labels.tolist()
    )
    got = loss_fn(emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)
    assert got.item() == pytest.approx(expected, abs=TOL)
    # the memory's pairs really count
    assert got.item() != pytest.approx(loss_fn(emb, labels).item(), abs=1e-6)


@pytest.mark.parametrize("case", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_empty_cross_batch_memory_equals_no_memory(case) -> None:
    _, loss_fn = case
    emb, labels = batch(5)
    empty = dict(ref_emb=torch.zeros(0, 4), ref_labels=torch.zeros(0, dtype=torch.long))
    assert torch.equal(loss_fn(emb, labels, **empty), loss_fn(emb, labels))


@pytest.mark.parametrize("case", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_metric_loss_gradients_are_finite(case) -> None:
    _, loss_fn = case
    emb, labels = batch(6)
    emb = torch.cat([emb, emb[:1]]).requires_grad_(True)  # a duplicate point: distance 0
    loss_fn(emb, torch.cat([labels, labels[:1]])).backward()
    assert emb.grad is not None
    assert torch.isfinite(emb.grad).all()


def test_lifted_ordered_pairs_equal_paper_formula() -> None:
    emb, labels = batch(8, size=9)
    expected = naive_lifted_paper(emb.tolist(), labels.tolist(), 1.0)
    assert lifted_structure_loss(emb, labels, 1.0).item() == pytest.approx(expected, abs=TOL)


def test_circle_loss_weights_carry_no_gradient() -> None:
    """Gradient of the per-element formula with α_p, α_n taken as constants (Sun et al.)."""
    emb, labels = batch(9, size=6)
    emb.requires_grad_(True)
    m, gamma = 0.25, 16.0
    z = F.normalize(emb, dim=1)
    terms = []
    for i in range(6):
        s_n = [z[i] @ z[n] for n in range(6) if labels[n] != labels[i]]
        s_p = [z[i] @ z[p] for p in range(6) if p != i and labels[p] == labels[i]]
        if not s_n or not s_p:
            continue
        sum_n = sum(torch.exp(gamma * max(0.0, s.item() + m) * (s - m)) for s in s_n)
        sum_p = sum(torch.exp(-gamma * max(0.0, 1 + m - s.item()) * (s - 1 + m)) for s in s_p)
        terms.append(torch.log(1 + sum_n * sum_p))
    (expected_grad,) = torch.autograd.grad(sum(terms) / len(terms), emb)
    (grad,) = torch.autograd.grad(circle_loss(emb, labels, m, gamma), emb)
    assert torch.allclose(grad, expected_grad, atol=TOL, rtol=0)


def test_triplet_without_valid_triplet_is_zero_with_grad() -> None:
    emb = torch.randn(4, 3)
    unique = torch.arange(4)  # no positives at all
    for mining in ("all", "hard", "semihard"):
        assert_zero_with_grad(lambda x, m=mining: triplet_loss(x, unique, 1.0, m), emb)
    # positives exist but every negative is farther than d(a,p) + margin: no semi-hard negative
    far = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert_zero_with_grad(lambda x: triplet_loss(x, labels, 1.0, "semihard"), far)


def test_metric_losses_without_pairs_are_zero_with_grad() -> None:
    emb = torch.randn(3, 4)
    one_class, unique = torch.zeros(3, dtype=torch.long), torch.arange(3)
    assert_zero_with_grad(lambda x: lifted_structure_loss(x, unique, 1.0), emb)
    assert_zero_with_grad(lambda x: lifted_structure_loss(x, one_class, 1.0), emb)
    assert_zero_with_grad(lambda x: circle_loss(x, one_class, 0.25, 32.0), emb)
    assert_zero_with_grad(lambda x: circle_loss(x, unique, 0.25, 32.0), emb)
    assert_zero_with_grad(lambda x: contrastive_loss(x[:1], unique[:1], 1.0), emb)


def test_triplet_rejects_unknown_mining() -> None:
    emb, labels = batch(0)
    with pytest.raises(ValueError):
        triplet_loss(emb, labels, 1.0, "easy")  # type: ignore[arg-type]


def test_ref_needs_both_parts() -> None:
    emb, labels = batch(0)
    with pytest.raises(ValueError):
        contrastive_loss(emb, labels, 1.0, ref_emb=emb)


def cube_triplet(
    emb: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
    margin: float, mining: str,
) -> torch.Tensor:  # fmt: skip
    """Every (a, p, n) triplet materialised as a [B, M, M] cube: the direct autograd reference."""
    cand, cand_labels = torch.cat([emb, ref]), torch.cat([labels, ref_labels])
    d = torch.cdist(emb, cand)  # [B, M]
    same = labels[:, None] == cand_labels[None, :]
    positive = same & ~torch.eye(*same.shape, dtype=torch.bool)
    d_ap, d_an = d[:, :, None], d[:, None, :]
    if mining == "all":
        return F.relu(d_ap - d_an + margin)[positive[:, :, None] & ~same[:, None, :]].mean()
    band = ~same[:, None, :] & (d_an > d_ap) & (d_an < d_ap + margin)
    nearest = d_an.expand_as(band).masked_fill(~band, math.inf).amin(dim=2)
    return (d - nearest + margin)[positive & band.any(dim=2)].mean()


@pytest.mark.parametrize("mining", ["all", "semihard"])
def test_triplet_without_the_cube_has_the_cubes_value_and_gradient(mining: str) -> None:
    emb, labels = batch(10, size=12, dim=6)
    ref, ref_labels = batch(11, size=40, dim=6)
    emb.requires_grad_(True)
    expected = cube_triplet(emb, labels, ref, ref_labels, 0.8, mining)
    (expected_grad,) = torch.autograd.grad(expected, emb)
    got = triplet_loss(emb, labels, 0.8, mining, ref, ref_labels)
    (grad,) = torch.autograd.grad(got, emb)
    assert got.item() == pytest.approx(expected.item(), abs=TOL)
    torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=0)


def test_triplet_over_a_large_memory_stays_small() -> None:
    """B = 512 anchors against M = 4096 candidates: the cube would be 8.6e9 triplets (69 GB)."""
    emb, labels = batch(12, size=512, classes=10, dim=16)
    ref, ref_labels = batch(13, size=3584, classes=10, dim=16)
    for mining in ("all", "semihard"):
        assert torch.isfinite(triplet_loss(emb, labels, 0.2, mining, ref, ref_labels))
