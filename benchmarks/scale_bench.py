"""How the dictionary side of a step scales: logits + InfoNCE cost as the number of negatives K
and the batch grow, the memory every dictionary holds, and proof that no dictionary is copied
per step.

- ``K``: forward + backward of ``losses.info_nce`` for queries [B, dim] against K queued keys,
  K = 1k .. 256k at a fixed batch; time, time per 1k negatives (flat when the cost is linear) and
  the peak memory the loss allocates (from the profiler's allocation events, so CPU works too).
- ``batch``: the same at a fixed K, B = 32 .. 512.
- ``memory``: bytes held by every dictionary (MoCo's queue, InstDisc's memory bank, XBM's
  cross-batch memory, SpCL's hybrid memory) at several sizes, per entry (flat when linear).
- ``copies``: 200 writes into each ring buffer/bank: the storage pointer never moves, and the
  largest single allocation during the writes is compared with the dictionary's own size (a
  copy per step would allocate the whole dictionary).

    .venv/bin/python benchmarks/scale_bench.py
    .venv/bin/python benchmarks/scale_bench.py --ks 1024 4096 --batches 8 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cltool.losses import info_nce
from cltool.memory import CrossBatchMemory, HybridMemory, KeyQueue, MemoryBank

MIB = 1 << 20


def unit(rows: int, dim: int, generator: torch.Generator, device: str) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1).to(device)


def loss_step(batch: int, K: int, dim: int, device: str) -> Callable[[], None]:
    """Forward and backward of InfoNCE over a full queue of K keys (the loss part of a step)."""
    g = torch.Generator().manual_seed(K + batch)
    q = unit(batch, dim, g, device).requires_grad_()
    k = unit(batch, dim, g, device)
    queue = unit(K, dim, g, device)

    def run() -> None:
        info_nce(q, k, queue, 0.2).backward()
        q.grad = None

    return run


def peak_allocation(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak bytes live above the start, largest single allocation) while ``fn`` runs, from the
    profiler's allocation events: works on the CPU, where torch keeps no memory statistics."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations inside an op are booked as the op's self memory, frees outside any op as
    # "[memory]" events: together, in time order, they trace the live bytes.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = largest = 0
    for event in events:
        delta = event.self_cpu_memory_usage
        live += delta
        peak = max(peak, live)
        largest = max(largest, delta)
    return peak, largest


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep(points: list[tuple[int, int]], dim: int, repeats: int, device: str) -> list[dict]:
    """Time and peak memory of the loss at each (batch, K), rounds interleaved over points."""
    steps = {point: loss_step(*point, dim, device) for point in points}
    times: dict[tuple[int, int], list[float]] = {p: [] for p in points}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for point, step in steps.items():
            start = time.perf_counter()
            step()
            times[point].append(time.perf_counter() - start)
    rows = []
    for (batch, K), step in steps.items():
        peak, _ = peak_allocation(step)
        seconds = statistics.median(times[(batch, K)])
        rows.append({"batch": batch, "K": K, "ms": 1e3 * seconds, "peak_mib": peak / MIB})
    return rows


def dictionaries(
    size: int, dim: int, batch: int
) -> dict[str, tuple[nn.Module, Callable[[int], None]]]:
    """Every dictionary at ``size`` entries, each with one step's write of ``batch`` rows."""
    g = torch.Generator().manual_seed(size)
    new = unit(batch, dim, g, "cpu")
    labels = torch.randint(0, 10, (batch,), generator=g)
    queue, xbm = KeyQueue(size, dim), CrossBatchMemory(size, dim)
    bank, hybrid = MemoryBank(size, dim, 0.5), HybridMemory(size, dim, 0.5)

    def rows(step: int) -> torch.Tensor:
        return (torch.arange(batch) + step * batch) % size

    return {
        "queue (MoCo)": (queue, lambda step: queue.enqueue(new, rows(step))),
        "memory bank (InstDisc)": (bank, lambda step: bank.update(rows(step), new)),
        "cross-batch (XBM)": (xbm, lambda step: xbm.enqueue(new, labels)),
        "hybrid (SpCL)": (hybrid, lambda step: hybrid.update(rows(step), new)),
    }


def held_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def memory_table(sizes: list[int], dim: int, batch: int) -> list[dict]:
    rows = []
    for size in sizes:
        for name, (module, _) in dictionaries(size, dim, batch).items():
            held = held_bytes(module)
            rows.append(
                {
                    "dictionary": name,
                    "entries": size,
                    "mib": held / MIB,
                    "bytes_per_entry": held / size,
                }
            )
    return rows


def storage_pointers(module: nn.Module) -> list[int]:
    return [b.untyped_storage().data_ptr() for b in module.buffers()]


def copy_check(size: int, dim: int, batch: int, writes: int) -> list[dict]:
    """Write ``writes`` batches into each dictionary: do its storages stay put, and is any
    allocation during the writes as large as the dictionary itself?"""
    rows = []
    for name, (module, write) in dictionaries(size, dim, batch).items():
        before = storage_pointers(module)

        def run(write: Callable[[int], None] = write) -> None:
            for step in range(writes):
                write(step)

        peak, largest = peak_allocation(run)
        rows.append(
            {
                "dictionary": name,
                "entries": size,
                "dictionary_mib": held_bytes(module) / MIB,
                "writes": writes,
                "storage_moved": storage_pointers(module) != before,
                "largest_alloc_kib": largest / 1024,
                "peak_kib": peak / 1024,
            }
        )
    rows.append(moco_negatives_view(size, dim, batch))
    return rows


def moco_negatives_view(size: int, dim: int, batch: int) -> dict:
    """MoCo reads its negatives as a slice of the queue: same storage, no copy."""
    queue = KeyQueue(size, dim)
    queue.enqueue(torch.randn(batch, dim))
    negatives = queue.negatives()
    return {
        "dictionary": "queue.negatives() view",
        "entries": size,
        "dictionary_mib": held_bytes(queue) / MIB,
        "writes": 1,
        "storage_moved": negatives.untyped_storage().data_ptr()
        != queue.keys.untyped_storage().data_ptr(),
        "largest_alloc_kib": 0.0,
        "peak_kib": 0.0,
    }


def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of ``rows`` with ``columns`` (key -> format spec)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], spec) for k, spec in columns.items()) + " |")
    return "\n".join(lines)


def with_linearity(rows: list[dict], key: str) -> list[dict]:
    """Add time per unit of ``key`` relative to the largest point: near 1.0 when the cost is
    linear (fixed costs lift small points above 1, cache-resident ones dip below)."""
    last = rows[-1]
    per_unit = last["ms"] / last[key]
    return [row | {"per_unit_vs_largest": row["ms"] / row[key] / per_unit} for row in rows]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--batch", type=int, default=128, help="batch of the K sweep")
    parser.add_argument("--K", type=int, default=4096, help="K of the batch sweep")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    by_k = with_linearity(
        sweep([(args.batch, K) for K in args.ks], args.dim, args.repeats, args.device), "K"
    )
    by_batch = with_linearity(
        sweep([(b, args.K) for b in args.batches], args.dim, args.repeats, args.device), "batch"
    )
    memory = memory_table(args.sizes, args.dim, args.batch)
    copies = copy_check(max(args.sizes), args.dim, args.batch, writes=200)
    loss_columns = {
        "batch": "d",
        "K": "d",
        "ms": ".2f",
        "per_unit_vs_largest": ".2f",
        "peak_mib": ".1f",
    }
    print(
        f"## scale: InfoNCE logits + loss (forward + backward), dim {args.dim}, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}, load {load:.1f}"
    )
    linear = "per_unit_vs_largest = (ms per unit) / (ms per unit at the largest point)"
    print(f"\n### K grows (batch {args.batch}); {linear}\n")
    print(markdown(by_k, loss_columns))
    print(f"\n### batch grows (K {args.K}); {linear}\n")
    print(markdown(by_batch, loss_columns))
    print("\n### memory held by each dictionary (all buffers)\n")
    print(
        markdown(
            memory, {"dictionary": "s", "entries": "d", "mib": ".2f", "bytes_per_entry": ".1f"}
        )
    )
    writes = copies[0]["writes"]
    print(f"\n### no copies: {writes} writes of batch {args.batch} into each dictionary\n")
    print(
        markdown(
            copies,
            {
                "dictionary": "s",
                "entries": "d",
                "dictionary_mib": ".2f",
                "storage_moved": "",
                "largest_alloc_kib": ".1f",
                "peak_kib": ".1f",
            },
        )
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        blob = {"by_K": by_k, "by_batch": by_batch, "memory": memory, "copies": copies}
        args.json.write_text(json.dumps(blob, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
