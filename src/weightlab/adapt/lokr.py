"""LoKr (Edalati et al. 2022, KronA; LyCORIS): a Kronecker-product update, PEFT's ``LOKR``.

dW = s * kron(W1, W2), s = alpha / r. out = a*b and in = c*d are split by PEFT's ``factorization``
(factors near the square root, or ``decompose_factor``): W1 (a x c) is the small factor and W2 (b x d)
the large one; W2 is full when r >= max(b, d)/2, else W2a (b x r) W2b (r x d); W1 is full unless
``decompose_both`` and r < max(a, c)/2. Conv2d: W2 carries the kernel, (b, d, kh, kw) or W2b (r, d*kh*kw)
(PEFT without ``use_effective_conv2d``). PEFT's init: W1 (or W1a) = 0, the rest kaiming-uniform(a=sqrt(5)),
so dW = 0; ``init="lycoris"`` (PEFT's ``init_weights="lycoris"``) zeros W2 (or W2b) instead. Defaults
are PEFT's: r=8, alpha=8, decompose_both false, decompose_factor -1. Forward, fold and PEFT folders as
LoHa (``adapt/loha.py``): PEFT's tensor names (``lokr_w1``, ``lokr_w2_a`` ...) under
``base_model.model.<name>.``. Not supported: ``rank_dropout``/``module_dropout`` (training only),
``use_effective_conv2d`` (``lokr_t2``), HF Conv1D (as PEFT).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..registry import Regime, register
from .loha import LohaConfig, LycorisMethod, kaiming


class LokrConfig(LohaConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    init: Literal["peft", "lycoris"] = "peft"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: m = factor when it divides, else the divisor pair nearest the
    square root whose smaller member stays <= factor (PEFT's / LyCORIS' rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        m2 = m + 1
        while dimension % m2:
            m2 += 1
        n2 = dimension // m2
        if m2 + n2 > m + n or m2 > factor:
            break
        m, n = m2, n2
    return (n, m) if m > n else (m, n)


@register("adapt", "lokr", kind="adapter", regime=Regime.WHOLE_MODEL, config=LokrConfig,
          paper="Edalati et al. 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter (arXiv 2212.10650); "
                "LyCORIS LoKr as PEFT's LOKR",
          summary="Kronecker-product update s * kron(W1, W2), W2 low-rank when large (PEFT LoKr)",
          layers="linear, conv2d", trainable="a*c + (b*d or r*(b+d)), out = a*b, in = c*d")
class LoKr(LycorisMethod):
    name = "lokr"
    peft_type = "LOKR"
    param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def create(self, layer, W0, init=True):
        c, g = self.cfg, self.generator()
        b_ = layer.base_layer
        conv = layer.kind == "conv2d"
        out_f = W0.shape[0]
        in_f = b_.in_channels // b_.groups if conv else W0.shape[1]
        ks = tuple(b_.kernel_size) if conv else ()
        kk = ks[0] * ks[1] if conv else 1
        (a, b), (cc, d) = factorization(out_f, c.decompose_factor), factorization(in_f, c.decompose_factor)
        r = c.r
        use_w1 = not (c.decompose_both and r < max(a, cc) / 2)
        use_w2 = r >= max(b, d) / 2
        lycoris = c.init == "lycoris"
        t = {}
        if use_w1:  # PEFT's order of draws: W1 side, then W2 side
            t["lokr_w1"] = kaiming((a, cc), g) if lycoris else torch.zeros(a, cc)
        else:
            t["lokr_w1_a"] = kaiming((a, r), g) if lycoris else torch.zeros(a, r)
            t["lokr_w1_b"] = kaiming((r, cc), g)
        if use_w2:
            t["lokr_w2"] = torch.zeros(b, d, *ks) if lycoris else kaiming((b, d, *ks), g)
        else:
            t["lokr_w2_a"] = kaiming((b, r), g)
            t["lokr_w2_b"] = torch.zeros(r, d * kk) if lycoris else kaiming((r, d * kk), g)
        self.put(layer, t if init else {k: torch.zeros_like(v) for k, v in t.items()})
        return W0

    def build(self, layer, dtype):
        a = layer.adapter

        def get(k):
            v = getattr(a, k)
            return v if dtype is None else v.to(dtype)

        w1 = get("lokr_w1") if hasattr(a, "lokr_w1") else get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2") if hasattr(a, "lokr_w2") else get("lokr_w2_a") @ get("lokr_w2_b")
        return torch.kron(w1, w2.reshape(w2.shape[0], -1)) * self.scale()  # (out, in*kh*kw), as PEFT's 4-D kron

    @classmethod
    def peft_conf(cls, cfg):
        return {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor,
                "rank_dropout_scale": False, "init_weights": True if cfg.init == "peft" else "lycoris"}

    @classmethod
    def import_config(cls, conf):
        return {"decompose_both": bool(conf.get("decompose_both", False)),
                "decompose_factor": int(conf.get("decompose_factor", -1))}
