"""Input statistics of one layer (feature norms, the Hessian proxy) as raw sums with a count."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .device import STAT_DTYPE


class ShardCursor:
    """Which shard (simulated rank) the batch now running belongs to; shared by a block's LayerStats."""

    def __init__(self, shards: int = 1):
        self.shards = shards
        self.shard = 0


@dataclass
class LayerStats:
    """Raw sums of one layer's inputs and their sequence count; means are taken once, at the end.

    ``sq_norms`` (mean over sequences of sum over tokens of x_j^2) and ``H`` (2/N sum x x^T, the
    Hessian proxy of SparseGPT/GPTQ) divide the sums by N = the number of sequences, as the
    references average over calibration samples. Sums (not running means) are what several
    processes can add up; with ``cursor.shards > 1`` one partial sum is kept per simulated rank and
    they are added in rank order, which is exactly what a 2-process all-reduce computes.
    Accumulation is float32 on the device of the inputs (TF32 off: see device.exact_matmul).
    """

    module: nn.Module
    hessian: bool = True
    cursor: ShardCursor | None = None
    _sq: list = field(default_factory=list)
    _xtx: list = field(default_factory=list)
    _n: list = field(default_factory=list)
    _final: tuple | None = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        rows = self._rows(x.detach()).to(STAT_DTYPE)
        k = self.cursor.shard if self.cursor is not None else 0
        while len(self._n) <= k:
            self._sq.append(torch.zeros(rows.shape[1], dtype=STAT_DTYPE, device=rows.device))
            self._xtx.append(torch.zeros(rows.shape[1], rows.shape[1], dtype=STAT_DTYPE, device=rows.device)
                             if self.hessian else None)
            self._n.append(0)
        self._sq[k].add_((rows * rows).sum(0))
        if self.hessian:
            self._xtx[k].addmm_(rows.T, rows)
        self._n[k] += batch
        self._final = None

    def hook(self, mod, inputs, output) -> None:
        self.add(inputs[0])

    def _fold(self):
        """(sum x^2, sum x x^T, N) with partial sums added in shard order."""
        if self._final is None:
            sq = xtx = None
            for s, h in zip(self._sq, self._xtx):
                sq = s if sq is None else sq + s
                xtx = h if xtx is None else (xtx + h if h is not None else xtx)
            self._final = (sq, xtx, sum(self._n))
        return self._final

    def reduce_(self, dist, width: int, device) -> None:
        """All-reduce (SUM) the sums and the count over the process group (zeros on a rank with no batch)."""
        sq, xtx, n = self._fold()
        if sq is None:
            sq = torch.zeros(width, dtype=STAT_DTYPE, device=device)
            xtx = torch.zeros(width, width, dtype=STAT_DTYPE, device=device) if self.hessian else None
        cnt = torch.tensor([n], dtype=torch.int64, device=sq.device)
        dist.all_reduce_(sq)
        if xtx is not None:
            dist.all_reduce_(xtx)
        dist.all_reduce_(cnt)
        self._sq, self._xtx, self._n, self._final = [sq], [xtx], [int(cnt)], None

    def scale_inputs_(self, s: torch.Tensor) -> None:
        """The layer's inputs became x / s (a per-channel scale folded into the layer before it, AWQ):
        the sums become those of the new inputs, sum (x/s)^2 and S^-1 (sum x x^T) S^-1."""
        for k in range(len(self._n)):
            inv = 1 / s.to(device=self._sq[k].device, dtype=torch.float64)
            self._sq[k].copy_(self._sq[k].double() * inv * inv)
            if self._xtx[k] is not None:
                self._xtx[k].mul_(inv.to(STAT_DTYPE)[:, None]).mul_(inv.to(STAT_DTYPE)[None, :])
        self._final = None

    @property
    def nsamples(self) -> int:
        return self._fold()[2]

    @property
    def sq_norms(self) -> torch.Tensor | None:
        sq, _, n = self._fold()
        return None if sq is None else sq / max(n, 1)

    @property
    def H(self) -> torch.Tensor | None:  # noqa: N802 - the papers' name
        _, xtx, n = self._fold()
        return None if xtx is None else xtx * (2 / max(n, 1))

    def take_H(self) -> torch.Tensor | None:  # noqa: N802
        """``H``, scaled in place from the raw sum and handed over: the statistics no longer hold it, so a
        solver may factor it in place (one d_in x d_in matrix instead of three at the peak)."""
        sq, xtx, n = self._fold()
        if xtx is None:
            return None
        self._xtx, self._final = [None] * len(self._xtx), (sq, None, n)
        return xtx.mul_(2 / max(n, 1))

    @property
    def feature_norms(self) -> torch.Tensor:
        """sqrt of the per-sequence mean of sum_tokens x_j^2: Wanda's ||x_j||_2 / sqrt(N_seq)."""
        return self.sq_norms.sqrt()
