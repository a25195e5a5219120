"""Memories of past embeddings and momentum-averaged weights.

Every memory is a :class:`torch.nn.Module` whose whole state lives in registered buffers, so it
moves with ``.to(device)`` and round-trips through ``state_dict()`` in a checkpoint.

``m`` is, everywhere in this project, the weight kept on the *old* value:
``v <- m * v + (1 - m) * new`` (MoCo's m = 0.999 barely moves the key encoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def momentum_update(dst: Tensor, src: Tensor, m: float) -> Tensor:
    """In place ``dst <- m * dst + (1 - m) * src`` and return ``dst``.

    The single exponential-moving-average rule behind MoCo's key encoder, InstDisc's memory bank
    and SpCL's hybrid memory.
    """
    return dst.mul_(m).add_(src, alpha=1.0 - m)


@torch.no_grad()
def update_momentum_encoder(encoder_k: nn.Module, encoder_q: nn.Module, m: float) -> None:
    """MoCo's momentum update θk <- m θk + (1 - m) θq (He et al. 2020, Eq. 2).

    All parameters are updated by one fused multi-tensor op (``torch._foreach_*``) instead of a
    Python loop of per-parameter kernels, which dominates the step time of small encoders.
    Buffers (BatchNorm running statistics) are not averaged but copied from the query encoder, so
    the key encoder normalises with the statistics of the encoder it follows.
    """
    params_k = list(encoder_k.parameters())
    params_q = list(encoder_q.parameters())
    buffers_k = list(encoder_k.buffers())
    buffers_q = list(encoder_q.buffers())
    if len(params_k) != len(params_q) or len(buffers_k) != len(buffers_q):
        raise ValueError("key and query encoders must have the same architecture")
    if params_k:
        torch._foreach_mul_(params_k, m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - m)
    if buffers_k:
        torch._foreach_copy_(buffers_k, buffers_q)


def cosine_momentum(m0: float, progress: float) -> float:
    """BYOL's schedule m = 1 - (1 - m0)(cos(π·progress) + 1)/2 (Grill et al. 2020, §3.2).

    Starts at ``m0`` (progress 0) and rises to 1 (progress 1): the target network follows the
    online one quickly at first and freezes towards the end of training.
    """
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _random_unit(rows: int, dim: int) -> Tensor:
    return F.normalize(torch.randn(rows, dim), dim=1)


class _Ring(nn.Module):
    """The bookkeeping of a ring buffer: the write pointer and the number of filled slots.

    Both are buffers (saved in checkpoints, moved with the module), and ``filled`` is also kept
    as a Python int, updated by every write from the row count the host already knows: reading
    the buffer on the hot path would make the host wait for the GPU at every step. A loaded
    state dict resets that copy; it is read again from the buffer when next needed.
    """

    ptr: Tensor
    filled: Tensor

    def __init__(self, filled: int) -> None:
        super().__init__()
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.tensor(filled, dtype=torch.long))
        self._filled_host: int | None = filled
        self.register_load_state_dict_post_hook(_forget_filled)

    @torch.no_grad()
    def _write(self, buffers: list[Tensor], values: list[Tensor]) -> None:
        """Write ``values`` (same first dimension B) into ring ``buffers`` (capacity K).

        Only the last min(B, K) rows can survive, so only those are written; their slots are
        ``(ptr + B - kept + arange(kept)) % K``, one ``index_copy_`` per buffer whatever B and
        K. The pointer advances by B, so the ring order is the same as writing every row in turn.
        """
        capacity = buffers[0].shape[0]
        count = values[0].shape[0]
        kept = min(count, capacity)
        slots = (self.ptr + (count - kept) + torch.arange(kept, device=self.ptr.device)) % capacity
        for buffer, value in zip(buffers, values, strict=True):
            buffer.index_copy_(0, slots, value[count - kept :].to(buffer.dtype))
        self.ptr.copy_((self.ptr + count) % capacity)
        self.filled.copy_((self.filled + kept).clamp_(max=capacity))
        if self._filled_host is not None:
            self._filled_host = min(self._filled_host + kept, capacity)

    def filled_count(self) -> int:
        """How many slots hold entries, without a device read once known."""
        if self._filled_host is None:
            self._filled_host = int(self.filled)
        return self._filled_host


def _forget_filled(module: nn.Module, _incompatible_keys: object) -> None:
    module._filled_host = None


class KeyQueue(_Ring):
    """MoCo's dictionary: a FIFO queue of the last K keys (He et al. 2020, §3.2).

    A preallocated ring buffer: enqueueing overwrites the oldest slots in place, so a step costs
    one ``index_copy_`` and never concatenates the queue. ``ids`` remembers which training sample
    produced each key (-1 for none), so a query can exclude its own stale keys from the negatives.

    With ``start_full=True`` (MoCo's choice) the queue starts as K random unit vectors that are all
    used as negatives from the first step; otherwise it starts empty and only filled slots are
    returned by :meth:`negatives`.
    """

    keys: Tensor
    ids: Tensor

    def __init__(self, K: int, dim: int, start_full: bool = True) -> None:
        if K < 1:
            raise ValueError(f"queue size K must be at least 1, got {K}")
        super().__init__(filled=K if start_full else 0)
        self.register_buffer("keys", _random_unit(K, dim) if start_full else torch.zeros(K, dim))
        self.register_buffer("ids", torch.full((K,), -1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor | None = None) -> None:
        """Push ``keys`` [B, dim] (and their sample ``ids`` [B]) and drop the oldest; any B."""
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        self._write([self.keys, self.ids], [keys.detach(), ids])

    def negatives(self) -> Tensor:
        """The valid keys [K_valid, dim]: all K once full, the filled slots before."""
        return self.keys[: self.filled_count()]

    def negative_ids(self) -> Tensor:
        """Sample ids [K_valid] of :meth:`negatives`, -1 where unknown."""
        return self.ids[: self.filled_count()]

    def stale_key_mask(self, ids: Tensor) -> Tensor:
        """[N, K_valid] bool, True where a negative is an old key of query sample ``ids`` [N].

        Pass it as ``negative_mask`` to :func:`cltool.losses.info_nce` so a sample is never
        pushed away from an earlier view of itself.
        """
        queue_ids = self.negative_ids()
        return (ids[:, None] == queue_ids[None, :]) & (queue_ids >= 0)[None, :]


class CrossBatchMemory(_Ring):
    """XBM's FIFO of past embeddings with their labels (Wang et al. 2020).

    Embeddings drift slowly once the model has warmed up, so those of recent iterations serve as
    extra pair candidates for a metric-learning loss. Starts empty.
    """

    embeddings: Tensor
    labels: Tensor

    def __init__(self, size: int, dim: int) -> None:
        if size < 1:
            raise ValueError(f"memory size must be at least 1, got {size}")
        super().__init__(filled=0)
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Push ``embeddings`` [B, dim] with ``labels`` [B], dropping the oldest; any B."""
        self._write([self.embeddings, self.labels], [embeddings.detach(), labels])

    def contents(self) -> tuple[Tensor, Tensor]:
        """(embeddings [M, dim], labels [M]) of the filled slots; M = 0 when empty."""
        filled = self.filled_count()
        return self.embeddings[:filled], self.labels[:filled]


class MemoryBank(nn.Module):
    """InstDisc's memory bank: one L2-normalised feature per training sample (Wu et al. 2018).

    Entries start as random unit vectors and follow the features with a momentum update
    v <- m v + (1 - m) f, renormalised to the unit sphere where the non-parametric softmax lives.
    """

    features: Tensor

    def __init__(self, n: int, dim: int, m: float) -> None:
        super().__init__()
        self.m = m
        self.register_buffer("features", _random_unit(n, dim))

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor) -> None:
        """v_i <- normalise(m v_i + (1 - m) f) for ``indices`` [B] and ``features`` [B, dim].

        Indices are assumed distinct within a call (one view per sample and step).
        """
        entries = momentum_update(self.features[indices], features.detach(), self.m)
        self.features.index_copy_(0, indices, F.normalize(entries, dim=1))

    def entries(self, indices: Tensor) -> Tensor:
        """The stored features [..., dim] of ``indices`` [...]."""
        return self.features[indices]

    def sample(
        self, shape: int | tuple[int, ...], generator: torch.Generator | None = None
    ) -> Tensor:
        """Indices of ``shape`` drawn from the uniform noise distribution Pn(i) = 1/n (NCE)."""
        shape = (shape,) if isinstance(shape, int) else shape
        device = generator.device if generator is not None else self.features.device
        indices = torch.randint(self.features.shape[0], shape, generator=generator, device=device)
        return indices.to(self.features.device)


class HybridMemory(MemoryBank):
    """SpCL's hybrid memory (Ge et al. 2020): instance features with a unified class set.

    Instance features follow the same momentum rule as :class:`MemoryBank`. After
    :meth:`set_clusters`, the classes of the unified contrastive loss are one centroid per
    cluster (the mean of its members' current features, normalised) followed by one class per
    un-clustered outlier (its own feature), in instance order. Before any clustering every
    instance is an outlier. Labelled source-domain class centroids can be prepended per call.
    """

    cluster_labels: Tensor
    class_index: Tensor
    num_clusters: Tensor

    def __init__(self, num_instances: int, dim: int, m: float) -> None:
        super().__init__(num_instances, dim, m)
        self.register_buffer("cluster_labels", torch.full((num_instances,), -1, dtype=torch.long))
        self.register_buffer("class_index", torch.arange(num_instances))
        self.register_buffer("num_clusters", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def set_clusters(self, labels: Tensor) -> None:
        """Take cluster ``labels`` [n] (any non-negative ids, -1 for outliers) from clustering.

        Cluster ids are compacted to 0..C-1 in increasing order of the given ids; outlier j (in
        instance order) becomes class C + j.
        """
        labels = labels.to(self.cluster_labels.device)
        clustered = labels >= 0
        cluster_ids, compact = torch.unique(labels[clustered], return_inverse=True)
        num_clusters = cluster_ids.numel()
        class_index = torch.empty_like(labels)
        class_index[clustered] = compact
        class_index[~clustered] = num_clusters + torch.arange(
            int((~clustered).sum()), device=labels.device
        )
        self.cluster_labels.copy_(torch.where(clustered, class_index, -1))
        self.class_index.copy_(class_index)
        self.num_clusters.fill_(num_clusters)

    def centroids(self) -> Tensor:
        """[C + O, dim]: normalised cluster means, then the outliers' own features."""
        clustered = self.cluster_labels >= 0
        sums = torch.zeros(
            int(self.num_clusters),
            self.features.shape[1],
            dtype=self.features.dtype,
            device=self.features.device,
        )
        sums.index_add_(0, self.cluster_labels[clustered], self.features[clustered])
        return torch.cat([F.normalize(sums, dim=1), self.features[~clustered]])

    def class_targets(self, indices: Tensor) -> Tensor:
        """Class [B] of instances ``indices`` [B] among :meth:`centroids`."""
        return self.class_index[indices]

    def hybrid_logits(
        self, f: Tensor, indices: Tensor, source_centroids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Unscaled logits f·c [B, (S +) C + O] and targets [B] for target-domain ``indices``.

        ``f`` [B, dim] are normalised features; divide the logits by the temperature and take the
        cross-entropy for SpCL's unified contrastive loss. With ``source_centroids`` [S, dim] the
        source classes come first and the targets shift by S; a source sample of class y has
        target y against the same logits.
        """
        classes = self.centroids()
        targets = self.class_targets(indices)
        if source_centroids is not None:
            classes = torch.cat([source_centroids, classes])
            targets = targets + source_centroids.shape[0]
        return f @ classes.T, targets
