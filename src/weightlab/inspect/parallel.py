"""Threads and processes for ``analysis.run``: BLAS limits, the default thread count, and the split of
the matrices over torch.distributed ranks."""
from __future__ import annotations

import os

from ..errors import ConfigError

def _blas_one_thread():
    """Limit BLAS to one thread per call while our own threads run layers in parallel (if threadpoolctl exists)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=1, user_api="blas")


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- several processes

def _world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) to split the layers over: torch.distributed's when it is initialised with more than
    one process and ``distributed`` is not False; (0, 1) otherwise."""
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ConfigError("distributed inspect needs an initialised torch.distributed process group "
                              "(launch with torchrun; the CLI initialises it from WORLD_SIZE/RANK)")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def share(costs: list[float], world: int) -> list[int]:
    """Owner rank of each job: longest job first to the least-loaded rank (greedy LPT bin packing).

    Every rank computes the same assignment from the same plan (ties go to the lowest rank), so
    no coordination is needed before the work starts.
    """
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _gather(payload):
    """Every rank's payload, in rank order. A rank that failed sends its error instead of results, so the
    others raise too rather than wait forever in the next collective."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, payload)
    return out
