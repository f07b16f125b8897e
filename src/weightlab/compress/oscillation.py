"""Weight oscillation in quantization-aware training (Nagel et al., "Overcoming Oscillations in
Quantization-Aware Training", ICML 2022), the measure OFQ uses (ref nbasyl/OFQ: TrackOscillation in
src/quantization/quantizer/lsq.py and statsq.py).

Per weight, each step, the integer level k_t of its quantized value is recorded. The weight *flips*
at step t when k_t != k_{t-1}; it *oscillates* when it flips in the direction opposite to its last
flip (sign(k_t - k_{t-1}) = -sign of the previous nonzero change). Oscillation frequency is the EMA
f_t = m o_t + (1 - m) f_{t-1} (m = 0.01, the reference's momentum).

``OscillationTracker`` holds one level function per tensor (``name -> () -> integer levels``) and is
stepped once per optimizer step. ``reset_window()`` starts a measurement window; ``summary()``
reports per group, over the window: oscillations and flips per weight per step, the share of weights
that oscillated at least once, and the share whose EMA frequency exceeds ``threshold`` at its end.
"""
from __future__ import annotations

from typing import Callable

import torch


class LevelTrace:
    """Oscillation state of one tensor of integer levels."""

    def __init__(self, levels: torch.Tensor, momentum: float = 0.01):
        self.momentum = momentum
        self.prev = levels.detach().clone()
        self.last_dir = torch.zeros_like(self.prev)  # sign of the last nonzero change; 0 before any
        self.ema = torch.zeros_like(self.prev, dtype=torch.float32)
        self.reset_window()

    def reset_window(self) -> None:
        self.steps = 0
        self.osc_count = torch.zeros_like(self.prev, dtype=torch.int32)
        self.flip_count = torch.zeros_like(self.prev, dtype=torch.int32)

    @torch.no_grad()
    def update(self, levels: torch.Tensor) -> torch.Tensor:
        """Record the next levels; returns this step's oscillation mask."""
        d = torch.sign(levels.detach() - self.prev)
        flipped = d != 0
        osc = (d * self.last_dir) == -1
        self.ema.mul_(1 - self.momentum).add_(osc.float(), alpha=self.momentum)
        self.last_dir = torch.where(flipped, d, self.last_dir)
        self.prev = levels.detach().clone()
        self.osc_count += osc.int()
        self.flip_count += flipped.int()
        self.steps += 1
        return osc


class OscillationTracker:
    """Track several tensors, grouped (e.g. "qk" vs "other") for the report."""

    def __init__(self, level_fns: dict[str, Callable[[], torch.Tensor]], groups: dict[str, str] | None = None,
                 momentum: float = 0.01, threshold: float = 0.01):
        self.level_fns = level_fns
        self.groups = groups or {}
        self.threshold = threshold
        self.traces = {n: LevelTrace(fn(), momentum) for n, fn in level_fns.items()}

    def step(self) -> None:
        for n, fn in self.level_fns.items():
            self.traces[n].update(fn())

    def reset_window(self) -> None:
        for t in self.traces.values():
            t.reset_window()

    def summary(self) -> dict[str, dict[str, float]]:
        """{group: {"osc_freq", "flip_freq", "frac_oscillated", "frac_ema_above", "weights"}}; group "all" too."""
        acc: dict[str, list] = {}
        for n, t in self.traces.items():
            for g in ("all", self.groups.get(n, "other")):
                acc.setdefault(g, []).append(t)
        out = {}
        for g, ts in acc.items():
            w = sum(t.prev.numel() for t in ts)
            steps = max(ts[0].steps, 1)
            out[g] = {
                "osc_freq": sum(int(t.osc_count.sum()) for t in ts) / (w * steps),
                "flip_freq": sum(int(t.flip_count.sum()) for t in ts) / (w * steps),
                "frac_oscillated": sum(int((t.osc_count > 0).sum()) for t in ts) / w,
                "frac_ema_above": sum(int((t.ema > self.threshold).sum()) for t in ts) / w,
                "weights": w,
            }
        return out
