"""Memories and momentum updates against their defining formulas, element by element."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from torch import nn

from cltool.memory import (
    CrossBatchMemory,
    HybridMemory,
    KeyQueue,
    MemoryBank,
    cosine_momentum,
    momentum_update,
    update_momentum_encoder,
)

pytestmark = pytest.mark.usefixtures("float64")


def fifo_order(keys: torch.Tensor, ptr: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """A ring buffer's valid rows, oldest first."""
    count, capacity = int(filled), keys.shape[0]
    if count < capacity:
        return keys[:count]
    return keys[(int(ptr) + torch.arange(capacity)) % capacity]


def run_queue(K: int, batch_sizes: list[int], start_full: bool) -> None:
    """Push batches through a KeyQueue and a deque(maxlen=K) and compare after every step."""
    dim = 3
    queue = KeyQueue(K, dim, start_full=start_full)
    reference: deque[tuple[list[float], int]] = deque(maxlen=K)
    if start_full:
        reference.extend((row.tolist(), -1) for row in queue.keys)
    next_id = 0
    for batch in batch_sizes:
        keys = torch.randn(batch, dim)
        ids = torch.arange(next_id, next_id + batch)
        next_id += batch
        queue.enqueue(keys, ids)
        for row, sample_id in zip(keys.tolist(), ids.tolist(), strict=True):
            reference.append((row, sample_id))
        assert fifo_order(queue.keys, queue.ptr, queue.filled).tolist() == [r for r, _ in reference]
        assert fifo_order(queue.ids, queue.ptr, queue.filled).tolist() == [i for _, i in reference]
        assert queue.negatives().shape == (len(reference), dim)
        # negatives() holds the valid entries, whatever their ring order
        assert sorted(queue.negatives().tolist()) == sorted(r for r, _ in reference)


@pytest.mark.parametrize(
    ("K", "batch_sizes"),
    [
        (8, [4, 4, 4, 4]),  # B divides K
        (7, [3, 3, 3, 3, 3]),  # wrap-around, K not a multiple of B
        (7, [3, 3, 2, 1]),  # short last batch
        (5, [12, 2, 9]),  # B > K keeps the last K
        (6, [6, 6]),
        (1, [3, 1, 2]),
    ],
)
@pytest.mark.parametrize("start_full", [False, True])
def test_queue_is_fifo(K: int, batch_sizes: list[int], start_full: bool) -> None:
    run_queue(K, batch_sizes, start_full)


def test_queue_start_full_is_random_unit_and_valid() -> None:
    queue = KeyQueue(16, 4)
    assert queue.negatives().shape == (16, 4)
    assert torch.allclose(queue.negatives().norm(dim=1), torch.ones(16))
    assert (queue.negative_ids() == -1).all()


def test_empty_queue_has_no_negatives() -> None:
    queue = KeyQueue(4, 3, start_full=False)
    assert queue.negatives().shape == (0, 3)
    queue.enqueue(torch.randn(2, 3))
    assert queue.negatives().shape == (2, 3)
    assert (queue.negative_ids() == -1).all()


def test_stale_key_mask_marks_own_keys() -> None:
    queue = KeyQueue(6, 2, start_full=True)
    queue.enqueue(torch.randn(3, 2), torch.tensor([10, 11, 12]))
    mask = queue.stale_key_mask(torch.tensor([11, 99, -1]))
    ids = queue.negative_ids().tolist()
    expected = [[j == sample and j >= 0 for j in ids] for sample in (11, 99, -1)]
    assert mask.tolist() == expected
    assert mask.sum() == 1


def test_queue_enqueue_does_not_keep_graph() -> None:
    queue = KeyQueue(4, 2, start_full=False)
    keys = torch.randn(2, 2, requires_grad=True)
    queue.enqueue(keys)
    assert not queue.keys.requires_grad


def test_queue_state_dict_round_trip() -> None:
    queue = KeyQueue(7, 3, start_full=False)
    for _ in range(3):
        queue.enqueue(torch.randn(3, 3), torch.randint(0, 100, (3,)))
    fresh = KeyQueue(7, 3, start_full=False)
    fresh.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"keys", "ids", "ptr", "filled"}
    assert torch.equal(fresh.negatives(), queue.negatives())
    assert torch.equal(fresh.negative_ids(), queue.negative_ids())
    batch = torch.randn(5, 3)
    queue.enqueue(batch)
    fresh.enqueue(batch)
    assert torch.equal(fresh.keys, queue.keys)
    assert int(fresh.ptr) == int(queue.ptr)
    assert int(fresh.filled) == int(queue.filled)


def test_cross_batch_memory_fifo_and_empty() -> None:
    memory = CrossBatchMemory(5, 2)
    emb, labels = memory.contents()
    assert emb.shape == (0, 2)
    assert labels.shape == (0,)
    reference: deque[tuple[list[float], int]] = deque(maxlen=5)
    for batch in (3, 4, 7, 1):
        e, y = torch.randn(batch, 2), torch.randint(0, 4, (batch,))
        memory.enqueue(e, y)
        reference.extend(zip(e.tolist(), y.tolist(), strict=True))
        stored = fifo_order(memory.embeddings, memory.ptr, memory.filled)
        stored_labels = fifo_order(memory.labels, memory.ptr, memory.filled)
        assert stored.tolist() == [r for r, _ in reference]
        assert stored_labels.tolist() == [y for _, y in reference]
        assert memory.contents()[0].shape[0] == len(reference)
    fresh = CrossBatchMemory(5, 2)
    fresh.load_state_dict(memory.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.contents(), memory.contents(), strict=True))


def test_memory_bank_update_matches_formula() -> None:
    n, dim, m = 6, 3, 0.7
    bank = MemoryBank(n, dim, m)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(n))
    before = bank.features.clone()
    indices = torch.tensor([4, 1])
    features = torch.randn(2, dim)
    bank.update(indices, features)
    for row in range(n):
        if row in indices.tolist():
            f = features[indices.tolist().index(row)].tolist()
            v = [m * a + (1 - m) * b for a, b in zip(before[row].tolist(), f, strict=True)]
            norm = math.sqrt(sum(x * x for x in v))
            expected = [x / norm for x in v]
        else:
            expected = before[row].tolist()
        assert bank.entries(torch.tensor(row)).tolist() == pytest.approx(expected, abs=1e-12)


def test_memory_bank_sample_is_seeded_and_in_range() -> None:
    bank = MemoryBank(10, 2, 0.5)
    a = bank.sample((4, 7), torch.Generator().manual_seed(3))
    b = bank.sample((4, 7), torch.Generator().manual_seed(3))
    assert a.shape == (4, 7)
    assert torch.equal(a, b)
    assert a.min() >= 0
    assert a.max() < 10
    assert bank.sample(5).shape == (5,)


def test_momentum_update_helper() -> None:
    dst, src = torch.randn(4), torch.randn(4)
    expected = [0.9 * a + 0.1 * b for a, b in zip(dst.tolist(), src.tolist(), strict=True)]
    out = momentum_update(dst, src, 0.9)
    assert out is dst
    assert dst.tolist() == pytest.approx(expected, abs=1e-12)


def make_encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("m", [0.0, 0.5, 0.999])
def test_update_momentum_encoder_matches_formula(m: float) -> None:
    encoder_q, encoder_k = make_encoder(0), make_encoder(1)
    encoder_q(torch.randn(8, 3))  # train-mode forward moves the BN running statistics
    old_k = [p.detach().clone() for p in encoder_k.parameters()]
    update_momentum_encoder(encoder_k, encoder_q, m)
    for new, old, q in zip(encoder_k.parameters(), old_k, encoder_q.parameters(), strict=True):
        expected = [
            m * a + (1 - m) * b
            for a, b in zip(old.flatten().tolist(), q.detach().flatten().tolist(), strict=True)
        ]
        assert new.detach().flatten().tolist() == pytest.approx(expected, abs=1e-12)
    for buffer_k, buffer_q in zip(encoder_k.buffers(), encoder_q.buffers(), strict=True):
        assert torch.equal(buffer_k, buffer_q)
    if m == 0.0:
        for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters(), strict=True):
            assert torch.equal(p_k, p_q)


def test_momentum_convention_m_weights_the_old_value() -> None:
    encoder_q, encoder_k = make_encoder(0), make_encoder(1)
    old = next(encoder_k.parameters()).detach().clone()
    update_momentum_encoder(encoder_k, encoder_q, 1.0)
    assert torch.equal(next(encoder_k.parameters()), old)  # m = 1 keeps the old weights
    update_momentum_encoder(encoder_k, encoder_q, 0.9)
    step = next(encoder_k.parameters()).detach() - old
    target = next(encoder_q.parameters()).detach() - old
    assert torch.allclose(step, 0.1 * target)  # moves only (1 - m) of the way to θq


def test_update_momentum_encoder_rejects_other_architecture() -> None:
    with pytest.raises(ValueError):
        update_momentum_encoder(nn.Linear(2, 2), make_encoder(0), 0.9)


def test_cosine_momentum() -> None:
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996, abs=1e-15)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0, abs=1e-15)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995, abs=1e-15)
    values = [cosine_momentum(0.9, t / 10) for t in range(11)]
    assert values == sorted(values)


def test_hybrid_memory_classes() -> None:
    n, dim = 7, 3
    memory = HybridMemory(n, dim, 0.5)
    # before clustering every instance is its own class
    assert torch.equal(memory.class_targets(torch.arange(n)), torch.arange(n))
    assert torch.equal(memory.centroids(), memory.features)
    memory.set_clusters(torch.tensor([2, -1, 2, 5, -1, 5, 5]))
    f = memory.features.tolist()

    def normalised_mean(rows: list[int]) -> list[float]:
        mean = [sum(f[r][c] for r in rows) / len(rows) for c in range(dim)]
        norm = math.sqrt(sum(x * x for x in mean))
        return [x / norm for x in mean]

    expected = [normalised_mean([0, 2]), normalised_mean([3, 5, 6]), f[1], f[4]]
    assert memory.centroids().tolist() == [pytest.approx(row, abs=1e-12) for row in expected]
    assert memory.class_targets(torch.arange(n)).tolist() == [0, 2, 0, 1, 3, 1, 1]

    batch = torch.nn.functional.normalize(torch.randn(3, dim), dim=1)
    indices = torch.tensor([4, 0, 6])
    logits, targets = memory.hybrid_logits(batch, indices)
    assert targets.tolist() == [3, 0, 1]
    for b in range(3):
        for c in range(4):
            dot = sum(x * y for x, y in zip(batch[b].tolist(), expected[c], strict=True))
            assert logits[b, c].item() == pytest.approx(dot, abs=1e-12)

    source = torch.nn.functional.normalize(torch.randn(2, dim), dim=1)
    logits, targets = memory.hybrid_logits(batch, indices, source)
    assert logits.shape == (3, 6)
    assert targets.tolist() == [5, 2, 3]
    assert torch.allclose(logits[:, :2], batch @ source.T)

    fresh = HybridMemory(n, dim, 0.5)
    fresh.load_state_dict(memory.state_dict())
    assert torch.equal(fresh.centroids(), memory.centroids())
    assert torch.equal(fresh.class_targets(indices), targets - 2)


def test_hybrid_memory_update_moves_centroid() -> None:
    memory = HybridMemory(4, 2, 0.0)  # m = 0: an entry becomes the (normalised) new feature
    memory.set_clusters(torch.tensor([0, 0, -1, -1]))
    memory.update(torch.tensor([0, 1]), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    s = 1 / math.sqrt(2)
    assert memory.centroids()[0].tolist() == pytest.approx([s, s], abs=1e-12)
