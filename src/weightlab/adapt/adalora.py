"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update whose rank budget is re-allocated while training.

dW = s / (ranknum + 1e-5) * B (A * E), A (r x in, right singular vectors), E (r x 1, singular values),
B (out x r, left singular vectors), s = alpha (r when alpha is 0) and ranknum = init_r: exactly PEFT's
``AdaLoraLayer`` (its names, shapes and order of operations; Conv2d: the update of the flattened
(out, in*kh*kw) weight, added as a conv as PEFT's ``SVDConv2d``). Init as PEFT: E = 0 (output unchanged),
A and B ~ N(0, 0.02); with no ``seed`` the draws come from torch's global generator in PEFT's order
(including its three throw-away ``randn`` calls), so the same ``torch.manual_seed`` gives PEFT's tensors.

Training adds the orthogonal regularizer orth_reg_weight * mean over the A and B matrices of
||A A^T - I||_F and ||B^T B - I||_F (the ``regularizer`` hook). The rank allocator runs in the
``on_model_step`` hook, after the optimizer step and before the gradients are cleared, as PEFT's
``update_and_allocate``: sensitivity I = |w * grad| per entry of A, E, B, smoothed
(Ibar = b1 Ibar + (1 - b1) I) with uncertainty (U = b2 U + (1 - b2) |I - Ibar|); a triplet's score is
Ibar*U of its E entry plus the row mean of A's and the column mean of B's; the budget falls from
sum(init_r) to target_r * layers as a cube between ``tinit`` and ``total_step - tfinal``; every ``deltaT``
steps the E entries scoring at or below the k-th smallest score, k = initial budget - budget, are zeroed
(one threshold across all layers). At ``total_step - tfinal`` the final mask is taken and the statistics
dropped; later steps re-apply that mask. The mask is a ``rank_mask`` buffer per layer (saved with the
adapter); PEFT export writes only the kept triplets and ``rank_pattern``, as PEFT's ``save_pretrained``.
``total_step`` None takes the training loop's (``tune`` passes its ``steps``).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod

PARAMS = ("lora_A", "lora_E", "lora_B")


class AdaLoraConfig(MethodConfig):
    init_r: int = Field(12, ge=1, description="initial rank of every update")
    target_r: int = Field(8, ge=0, description="average rank per layer at the end of the budget schedule")
    alpha: float = Field(8.0, ge=0, description="s in s/ranknum (0: the layer's rank, as PEFT)")
    dropout: float = 0.0
    tinit: int = Field(0, ge=0, description="steps before the budget starts to fall")
    tfinal: int = Field(0, ge=0, description="steps trained on the final mask")
    deltaT: int = Field(1, ge=1, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0)
    total_step: int | None = Field(None, gt=0, description="training steps (None: the training loop's)")
    # not "rank_pattern": attach's own rank_pattern ({key: r}) overrides r per layer; this is PEFT AdaLoRA's
    triplets: dict[str, list[bool]] | None = Field(
        None, description="per layer, which of the init_r triplets it still has (an imported PEFT AdaLoRA "
                          "adapter's rank_pattern: its tensors hold only the kept ones)")
    seed: int | None = None

    @model_validator(mode="after")
    def _schedule(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_step is not None:
            check_schedule(self.tinit, self.tfinal, self.total_step)
        return self


def check_schedule(tinit: int, tfinal: int, total_step: int) -> None:
    if tinit >= total_step - tfinal:
        raise ValueError(f"tinit ({tinit}) >= total_step ({total_step}) - tfinal ({tfinal}): no step is left to "
                         "reduce the budget; lower tinit/tfinal or train longer")


def budget_schedule(step: int, init_bgt: int, target_bgt: int, cfg, total_step: int) -> tuple[int, bool]:
    """(budget, whether to mask at this step): PEFT's ``RankAllocator.budget_schedule``, the paper's eq. (9)."""
    if step <= cfg.tinit:
        return init_bgt, False
    if step > total_step - cfg.tfinal:
        return target_bgt, True
    mul = 1 - (step - cfg.tinit) / (total_step - cfg.tfinal - cfg.tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % cfg.deltaT == 0


@register("adapt", "adalora", kind="adapter", regime=Regime.WHOLE_MODEL, config=AdaLoraConfig,
          paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (ICLR 2023, "
                "arXiv 2303.10512); PEFT's ADALORA semantics",
          summary="SVD-form update B(E*A) with orthogonal regularizer; triplets pruned to a falling global "
                  "rank budget by smoothed |w*grad| sensitivity (PEFT AdaLoRA)",
          layers="linear, conv1d, conv2d", trainable="init_r*(in+out+1)")
class AdaLoRA(AdapterMethod):
    name = "adalora"
    layer_kinds = ("linear", "conv1d", "conv2d")
    peft_type = "ADALORA"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ema: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the allocator's Ibar, U per tensor

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        cfg = self.cfg
        pattern = (cfg.triplets or {}).get(layer.layer_name)
        if pattern is not None and len(pattern) != cfg.init_r:
            raise ConfigError(f"adalora triplets of '{layer.layer_name}' has {len(pattern)} entries, "
                              f"init_r is {cfg.init_r}")
        r = sum(map(bool, pattern)) if pattern is not None else cfg.init_r
        if init:
            g = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
            # PEFT draws randn for A, E, B and ranknum before re-initialising A and B: the same draws keep
            # weightlab's init equal to PEFT's under one torch.manual_seed
            for shape in ((r, in_f), (r, 1), (out_f, r), (1,)):
                torch.randn(shape, generator=g)
            A = torch.empty(r, in_f).normal_(0.0, 0.02, generator=g)
            B = torch.empty(out_f, r).normal_(0.0, 0.02, generator=g)
        else:
            A, B = torch.zeros(r, in_f), torch.zeros(out_f, r)
        a, dt = layer.adapter, layer.base_layer.weight.dtype
        a.lora_A = nn.Parameter(A.to(dt))
        a.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dt))
        a.lora_B = nn.Parameter(B.to(dt))
        # PEFT keeps s / ranknum at init_r even after pruning shrinks the tensors; not saved (a config value)
        a.register_buffer("ranknum", torch.full((1,), float(cfg.init_r), dtype=dt), persistent=False)
        a.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool))
        a.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        return W0

    def scale(self, layer) -> float:
        return self.cfg.alpha if self.cfg.alpha > 0 else float(layer.adapter.lora_A.shape[0])

    def delta(self, layer, W):
        a = layer.adapter
        return a.lora_B.float() @ (a.lora_A.float() * a.lora_E.float()) * self.scale(layer) / (a.ranknum.float()
                                                                                              + 1e-5)

    def delta_forward(self, layer, x):
        a = layer.adapter
        xi = a.drop(x.to(a.lora_A.dtype))
        y = (xi @ (a.lora_A * a.lora_E).T @ a.lora_B.T) * self.scale(layer) / (a.ranknum + 1e-5)  # PEFT's order
        return y.to(x.dtype)

    def forward(self, layer, x):
        if layer.kind != "conv2d":
            return layer.base_layer(x) + self.delta_forward(layer, x)
        a, b = layer.adapter, layer.base_layer
        dW = (a.lora_B @ (a.lora_A * a.lora_E) * self.scale(layer) / (a.ranknum + 1e-5)).reshape(b.weight.shape)
        d = F.conv2d(a.drop(x.to(dW.dtype)), dW, None, b.stride, b.padding, b.dilation, b.groups)
        return b(x) + d.to(x.dtype)

    def regularizer(self, layer):
        a = layer.adapter
        val = None
        for cov in (a.lora_A @ a.lora_A.T, a.lora_B.T @ a.lora_B):
            eye = torch.eye(*cov.shape, out=torch.empty_like(cov))
            n = torch.norm(cov - eye, p="fro")
            val = n if val is None else val + n
        return val, 2  # PEFT averages over the A and B matrices

    def regularizer_weight(self) -> float:
        return self.cfg.orth_reg_weight

    def trainable_count(self, out_f, in_f):
        return self.cfg.init_r * (out_f + in_f + 1)

    @classmethod
    def on_model_step(cls, layers, step, total_steps):
        allocate(layers, step, total_steps)

    # -- PEFT folders -----------------------------------------------------------------------
    @classmethod
    def peft_export(cls, cfg, per_layer, shared=None):
        sd, pattern = {}, {}
        for n, _, t, _, _ in per_layer:
            keep = t["rank_mask"].bool().cpu()
            for k in PARAMS:  # only the kept triplets, as PEFT's save_pretrained with a rank_pattern
                v = t[k]
                sd[f"base_model.model.{n}.{k}"] = (v[:, keep] if k == "lora_B" else v[keep]).contiguous()
            pattern[f"{n}.lora_E"] = full_pattern(cfg, n, keep)
        pruned = any(not all(p) for p in pattern.values())
        total = cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1  # PEFT needs one
        conf = {"peft_type": "ADALORA", "r": 8, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                "target_modules": sorted(n for n, *_ in per_layer),
                "fan_in_fan_out": any(k == "conv1d" for _, k, *_ in per_layer), "bias": "none",
                "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
                "layers_pattern": None, "init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit,
                "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2,
                "orth_reg_weight": cfg.orth_reg_weight, "total_step": total,
                "rank_pattern": pattern if pruned else None}
        return sd, conf

    @classmethod
    def peft_import(cls, model, conf, sd, attach_exact):
        rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_[AEB])(?:\.[^.]+)?(?:\.weight)?$")
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            if m := rx.match(k):
                layers.setdefault(m.group(1), {})[m.group(2)] = v
            elif not re.search(r"\.ranknum(\.|$)", k):
                raise ConfigError(f"PEFT ADALORA tensor '{k}' is not supported (only Linear/Conv1D/Conv2d lora_A, "
                                  "lora_E, lora_B; AdaLoRA embeddings and modules_to_save are not)")
        if not layers:
            raise ConfigError("the PEFT ADALORA adapter holds no lora_A/lora_E/lora_B tensors")
        init_r = int(conf.get("init_r", 12))
        patterns = {}
        for key, p in (conf.get("rank_pattern") or {}).items():
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_E(?:\.[^.]+)?$", key)
            patterns[m.group(1) if m else key] = [bool(b) for b in p]
        for n, t in layers.items():
            if set(t) != set(PARAMS):
                raise ConfigError(f"PEFT ADALORA layer {n}: tensors {sorted(t)}, expected {list(PARAMS)}")
            r = t["lora_A"].shape[0]
            want = sum(patterns[n]) if n in patterns else init_r
            if r != want:
                raise ConfigError(f"PEFT ADALORA layer {n}: rank {r} but its rank_pattern/init_r give {want}")
        kw = dict(init_r=init_r, target_r=int(conf.get("target_r", 8)), alpha=float(conf.get("lora_alpha", 8)),
                  dropout=float(conf.get("lora_dropout") or 0.0), tinit=int(conf.get("tinit", 0)),
                  tfinal=int(conf.get("tfinal", 0)), deltaT=int(conf.get("deltaT", 1)),
                  beta1=float(conf.get("beta1", 0.85)), beta2=float(conf.get("beta2", 0.85)),
                  orth_reg_weight=float(conf.get("orth_reg_weight", 0.5)), total_step=conf.get("total_step"),
                  triplets={n: p for n, p in patterns.items() if n in layers} or None)
        wrapped = attach_exact(model, cls.name, list(layers), **kw)
        with torch.no_grad():
            for n, t in layers.items():
                a = wrapped[n].adapter
                for k in PARAMS:
                    getattr(a, k).copy_(t[k].reshape(getattr(a, k).shape))
        return model


def full_pattern(cfg, name: str, keep: torch.Tensor) -> list[bool]:
    """A layer's mask over its init_r triplets (a pruned layer's kept ones sit where its triplets put them)."""
    given = (cfg.triplets or {}).get(name)
    if given is None:
        return [bool(b) for b in keep.tolist()] + [False] * (cfg.init_r - keep.numel())
    out, it = [], iter(keep.tolist())
    for b in given:
        out.append(bool(next(it)) if b else False)
    return out


def rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    """Each AdaLoRA layer's current mask over its init_r triplets (True: kept)."""
    from .api import adapter_layers

    return {n: full_pattern(m.method.cfg, n, m.adapter.rank_mask.cpu())
            for n, m in adapter_layers(model).items() if isinstance(m.method, AdaLoRA)}


# -- the rank allocator (PEFT's RankAllocator, driven by AdaLoraModel.update_and_allocate) -----------------
@torch.no_grad()
def _update_ipt(layers, cfg) -> None:
    for lay in layers:
        for k in PARAMS:
            p = getattr(lay.adapter, k)
            g = p.grad if p.grad is not None else torch.zeros_like(p)  # unused in the forward: no sensitivity
            ipt = (p * g).abs().detach()
            avg, unc = lay.method.ema.get(k, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = cfg.beta1 * avg + (1 - cfg.beta1) * ipt
            unc = cfg.beta2 * unc + (1 - cfg.beta2) * (ipt - avg).abs()
            lay.method.ema[k] = (avg, unc)


def triplet_scores(lay) -> torch.Tensor:
    """One score per triplet: E's smoothed sensitivity x uncertainty plus A's row mean and B's column mean."""
    s = {k: avg * unc for k, (avg, unc) in lay.method.ema.items()}
    ab = torch.cat([s["lora_A"].mean(dim=1, keepdim=True), s["lora_B"].mean(dim=0).view(-1, 1)], dim=1).sum(dim=1)
    return s["lora_E"].view(-1) + ab.view(-1)


@torch.no_grad()
def _mask_to_budget(layers, budget: int) -> None:
    init_bgt = sum(lay.adapter.lora_A.shape[0] for lay in layers)
    k = init_bgt - budget
    if k <= 0 or any(not lay.method.ema for lay in layers):
        return  # nothing to remove (PEFT would fail in kthvalue), or no statistics yet: keep every triplet
    scores = [triplet_scores(lay) for lay in layers]
    dev = scores[0].device
    thr = torch.kthvalue(torch.cat([s.to(dev) for s in scores]), k=k)[0].item()
    for lay, s in zip(layers, scores):
        drop = s <= thr
        lay.adapter.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
        lay.adapter.rank_mask.copy_(~drop)


@torch.no_grad()
def _apply_mask(layers) -> None:
    for lay in layers:
        lay.adapter.lora_E.masked_fill_(~lay.adapter.rank_mask.view(-1, 1), 0.0)


def allocate(layers, step: int, total_steps: int) -> int | None:
    """One call of PEFT's ``update_and_allocate(step)`` over these AdaLoRA layers; returns the budget when masked."""
    cfg = layers[0].method.cfg
    total = cfg.total_step if cfg.total_step is not None else total_steps
    try:
        check_schedule(cfg.tinit, cfg.tfinal, total)
    except ValueError as e:
        raise ConfigError(f"adalora: {e}") from None
    final = total - cfg.tfinal
    init_bgt = sum(lay.adapter.lora_A.shape[0] for lay in layers)
    target_bgt = cfg.target_r * len(layers)
    if step < final:
        _update_ipt(layers, cfg)
        budget, mask = budget_schedule(step, init_bgt, target_bgt, cfg, total)
        if mask:
            _mask_to_budget(layers, budget)
            return budget
    elif step == final:
        budget, _ = budget_schedule(step, init_bgt, target_bgt, cfg, total)
        _mask_to_budget(layers, budget)
        for lay in layers:
            lay.method.ema = {}
        return budget
    else:
        _apply_mask(layers)
    return None


__all__ = ["AdaLoRA", "AdaLoraConfig", "allocate", "budget_schedule", "rank_pattern", "triplet_scores"]
