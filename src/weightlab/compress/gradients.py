"""Per-sample gradient moments of the LM loss for chosen layers (one backward per sequence)."""
from __future__ import annotations

import torch

from ..engine.calibration import is_conv1d_hf
from ..engine.progress import progress


def gradient_moments(model: torch.nn.Module, batches: list, layers: dict, show_progress=None,
                     loss_fn=None) -> dict[str, dict[str, torch.Tensor]]:
    """For each layer: {"mean": mean_n g, "sq": mean_n g^2, "abs": mean_n |g|, "n": N} in (out, in) layout.

    The model's own parameters are frozen except the layers' weights; batch 1 per sequence
    (labels = inputs) as the GBLM reference does. ``loss_fn(model, row)`` overrides the loss.
    """
    params = {n: m.weight for n, m in layers.items()}
    acc = {n: {k: torch.zeros_like(p, dtype=torch.float32) for k in ("mean", "sq", "abs")} for n, p in params.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    count = 0
    try:
        for batch in progress(batches, "gradients", enabled=show_progress):
            for row in batch["input_ids"].split(1):
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, row) if loss_fn else model(input_ids=row, labels=row).loss
                loss.backward()
                count += 1
                for n, p in params.items():
                    g = p.grad.float()
                    acc[n]["mean"] += g
                    acc[n]["sq"] += g * g
                    acc[n]["abs"] += g.abs()
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
    out = {}
    for n, a in acc.items():
        t = {k: v / max(count, 1) for k, v in a.items()}
        if is_conv1d_hf(layers[n]):
            t = {k: v.T for k, v in t.items()}
        out[n] = {**{k: v.reshape(v.shape[0], -1) for k, v in t.items()}, "n": count}
    return out
