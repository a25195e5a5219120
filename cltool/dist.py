"""torch.distributed for one run over several processes: setup, rank queries and the gathers the
methods need.

Every helper is the identity (or answers rank 0 of 1) when no process group is up, so the
single-process path runs the exact code it ran before distributed training existed. The process
group is set up from the environment that the local launcher (:func:`launch_local`) or SLURM
(through submitit) provides; collectives carry a timeout, so a rank that dies takes the run down
with an error instead of leaving the others waiting forever.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cltool.errors import CLToolError, InputError
from cltool.signals import STOP_SIGNALS, ForwardToRanks

#: Seconds a collective may wait for the other ranks; it also bounds how long the other ranks
#: wait at a barrier while rank 0 evaluates, hence the generous default.
TIMEOUT_ENV = "CL_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def free_port() -> int:
    """A TCP port nobody listens on now, for the rendezvous of a local launch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_slurm_env() -> None:
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK) from SLURM's variables, as
    submitit derives them, for a task that SLURM started."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_from_env(device: torch.device) -> bool:
    """Join the process group the environment describes; False when it describes one process.

    NCCL for CUDA devices, gloo otherwise. A world size above one without a rendezvous address
    is an error worth a clear message, not a hang.
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        export_slurm_env()  # one of several tasks that srun (submitit) started
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or is_distributed():
        return is_distributed()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch with --nproc")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def _backend_device(x: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo takes any CPU tensor."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal shapes), concatenated along dim 0 in rank order."""
    if not is_distributed():
        return x
    with torch.no_grad():
        local = x.detach().to(_backend_device(x)).contiguous()
        parts = [torch.empty_like(local) for _ in range(world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(x.device)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums the gradient over ranks and keeps this
    rank's rows. With every rank computing the same loss on the gathered rows, the summed
    gradient is world_size times the global one, and DDP's average brings it back to exactly the
    single-process gradient on the global batch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = len(x)
        return all_gather_no_grad(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_no_grad`, but gradients reach every rank's own rows."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def own_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's block of a tensor gathered in rank order."""
    return x.chunk(world_size())[rank()]


def shuffle_across_ranks(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN's shuffle: the global batch permuted by a seed all ranks share, and this rank's
    block of it; returns that block and the permutation, for :func:`unshuffle`."""
    gathered = all_gather_no_grad(x)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(gathered), generator=generator).to(x.device)
    return own_rows(gathered[order]), order


def unshuffle(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """This rank's outputs for its own inputs, from every rank's outputs on the shuffled batch."""
    return own_rows(all_gather_no_grad(y)[torch.argsort(order)])


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on one (a stop request must stop all ranks at the
    same step, or the others would wait at the next collective)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _worker(
    local_rank: int, nproc: int, port: int, target: Callable[..., None], args: tuple
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    target(*args)


def launch_local(
    nproc: int,
    target: Callable[..., None],
    *args: Any,
    announce_stop: Callable[[int], None] | None = None,
) -> int | None:
    """Run ``target(*args)`` in ``nproc`` processes on this machine, wired for
    :func:`init_from_env`; returns the stop signal that ended them early, if one did.

    A stop signal to this process goes on to the ranks (:mod:`cltool.signals`), which stop
    together at the next step. A rank that raises or dies ends all of them with a CLToolError,
    unless a stop was asked for: a rank caught by Ctrl-C before its handler was installed is
    part of the stop, not a failure.
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _worker,
        args=(nproc, free_port(), target, args),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    forward = ForwardToRanks(context.pids(), announce_stop).install()
    try:
        while not context.join(timeout=0.5):
            pass
    except mp.ProcessRaisedException as err:
        if not forward.flag.requested:
            last = str(err).strip().splitlines()[-1]
            raise CLToolError(f"rank {err.error_index} of {nproc} failed: {last}") from None
    except mp.ProcessExitedException as err:
        if not forward.flag.requested:
            raise CLToolError(
                f"rank {err.error_index} of {nproc} died (exit code {err.exit_code}); "
                "the other ranks were stopped"
            ) from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return forward.flag.signum
