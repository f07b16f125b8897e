"""Data-parallel calibration on torch.distributed (torchrun / accelerate launch).

Calibration batches are split into contiguous shards in a fixed global order (rank r gets the
r-th shard; a rank with no batch still joins every collective with zero sums). Every statistic
is a raw sum with an integer count, so a SUM all-reduce followed by one division gives the
single-process statistic up to float summation order (bit-exact for 2 ranks: each element is
a + b). Rank 0 alone runs the compression rule and broadcasts the block's new parameters, so
every rank propagates identical weights even where kernels are not deterministic; rank 0 alone
writes. Before each block's reductions the ranks compare a digest of the ordered (name, shape)
list: Hessians of different layers have the same shape, and summing the wrong partners would
be silent.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class DistContext:
    rank: int
    world: int
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_bounds(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.world, self.rank)

    def shard(self, batches: list) -> list:
        lo, hi = self.shard_bounds(len(batches))
        return batches[lo:hi]

    def check_same(self, names_shapes: list[tuple[str, tuple]], what: str) -> None:
        import torch.distributed as dist

        digest = hashlib.sha256(repr(names_shapes).encode()).hexdigest()
        got = [None] * self.world
        dist.all_gather_object(got, digest, group=self.group)
        if len(set(got)) != 1:
            raise ConfigError(f"ranks disagree on the {what} to reduce (different models or module order); "
                              f"digests per rank: {[g[:8] for g in got]}")

    def all_reduce_(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers of ``module`` on every rank (in place)."""
        import torch.distributed as dist

        with torch.no_grad():
            for _, t in sorted(list(module.named_parameters()) + list(module.named_buffers()), key=lambda x: x[0]):
                dist.broadcast(t.data, src=0, group=self.group)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous shard [lo, hi) of ``n`` items for ``rank``: the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_of(n: int, world: int) -> list[int]:
    """The rank that owns each of ``n`` items (the same split as ``shard_bounds``)."""
    out = []
    for r in range(world):
        lo, hi = shard_bounds(n, world, r)
        out.extend([r] * (hi - lo))
    return out


def current(distributed: bool | None = None) -> DistContext | None:
    """The DistContext of an initialised process group (or one started from torchrun's env), else None.

    ``distributed=None`` uses the group when one is initialised or WORLD_SIZE > 1 in the environment;
    False never does; True requires it.
    """
    import torch.distributed as dist

    if distributed is False or not dist.is_available():
        if distributed:
            raise ConfigError("torch.distributed is not available in this torch build")
        return None
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            if distributed:
                raise ConfigError("--distributed needs a launcher: run under torchrun or accelerate launch "
                                  "(WORLD_SIZE is not set)")
            return None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.get_world_size() <= 1:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size())
