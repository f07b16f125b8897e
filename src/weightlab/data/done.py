"""DONE: doubly robust instance-reweighted adversarial training (Sow et al., ICLR 2024), the whole protocol.

Each step: PGD (L-inf) adversarial examples x_i + delta_i (Madry et al.'s attack: random start in the
eps-ball, `steps` signed-gradient ascent steps on the cross-entropy, projection back onto the ball) ->
per-sample adversarial losses l_i -> KL-DRO weights w = softmax(l / r) over the batch, detached
(`DROReweighter`, or its CID running-mean option) -> one optimiser step on sum_i w_i l_i, which is the
exact batch gradient of r log mean exp(l / r). weighting="uniform" is plain PGD adversarial training
(Madry), the baseline the paper compares against.

    hist = train_done(model, x, y, DONEConfig(epsilon=0.3, step_size=0.075, epochs=30))
    rob = robust_accuracy(model, x_test, y_test, DONEConfig(epsilon=0.3, steps=20))

Not a registry method of its own: the registered piece is the weighting (data/dro, kind reweighter), and
this module is the in-memory training protocol around it.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import MethodConfig
from .dro import DROConfig, DROReweighter


class DONEConfig(MethodConfig):
    """Attack defaults are the paper's CIFAR-10 setting (images in [0, 1]: eps 8/255, step 2/255, 10 steps);
    on standardised features pick eps in those units. Optimiser: SGD momentum 0.9, weight decay 5e-4 as the
    adversarial-training literature; lr/epochs are for the small zoo MLPs, not the paper's ResNets."""

    epsilon: float = Field(8 / 255, ge=0, description="L-inf radius of the attack")
    step_size: float = Field(2 / 255, gt=0, description="PGD step (alpha)")
    steps: int = Field(10, ge=1, description="PGD steps (training attack; evaluate with more, e.g. 20)")
    random_start: bool = Field(True, description="start from a uniform point of the eps-ball (Madry)")
    clip: tuple[float, float] | None = Field(None, description="input domain box, e.g. (0, 1) for images")
    weighting: Literal["dro", "uniform"] = Field("dro", description="dro = DONE; uniform = PGD-AT baseline")
    temperature: float = Field(1.0, gt=0, description="r: KL regularisation (r -> inf = uniform)")
    momentum: float | None = Field(None, gt=0, le=1, description="CID running-mean rate; None = per-batch softmax")
    warmup_epochs: int = Field(0, ge=0, description="first epochs with uniform weights")
    epochs: int = Field(30, ge=0)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = 0


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, step_size: float,
               steps: int, random_start: bool = True, clip: tuple[float, float] | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD on the cross-entropy; returns x_adv with ||x_adv - x||_inf <= epsilon (detached).

    Only the input gets gradients: the model's .grad fields are left as they were."""
    if steps < 1 or step_size <= 0 or epsilon < 0:
        raise ConfigError(f"PGD needs steps >= 1, step_size > 0, epsilon >= 0; got {steps}, {step_size}, {epsilon}")
    x = x.detach()
    if random_start and epsilon > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        adv = x + (2 * noise - 1) * epsilon
    else:
        adv = x.clone()
    if clip is not None:
        adv = adv.clamp(*clip)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y, reduction="sum")  # sum: per-sample gradients are not averaged
        (g,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step_size * g.sign()
        adv = torch.max(torch.min(adv, x + epsilon), x - epsilon)  # project onto the eps-ball
        if clip is not None:
            adv = adv.clamp(*clip)
    return adv.detach()


def train_done(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DONEConfig | None = None,
               **params) -> dict:
    """Adversarially train `model` in place (DONE or uniform PGD-AT); returns a history dict.

    history: per epoch the mean adversarial loss, and the batch weights' max and effective sample
    size (1 / sum w^2, relative to the batch) averaged over steps."""
    cfg = cfg if cfg is not None else DONEConfig(**params)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"need as many labels as inputs (> 0); got {x.shape[0]} inputs, {y.shape[0]} labels")
    gen = torch.Generator().manual_seed(cfg.seed)
    rw = DROReweighter(DROConfig(temperature=cfg.temperature, momentum=cfg.momentum))
    params_ = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params_, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    hist = {"adv_loss": [], "max_weight": [], "ess": []}
    n = x.shape[0]
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        tot, mx, ess, steps = 0.0, 0.0, 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            model.eval()  # the attack sees the deployed model (no BN statistics update)
            xa = pgd_attack(model, xb, yb, cfg.epsilon, cfg.step_size, cfg.steps, cfg.random_start, cfg.clip, gen)
            model.train()
            losses = F.cross_entropy(model(xa), yb, reduction="none")
            if cfg.weighting == "uniform" or epoch < cfg.warmup_epochs:
                w = torch.full_like(losses, 1.0 / losses.numel())
                loss = losses.mean()
            else:
                loss = rw(losses)
                w = rw.last_weights
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(losses.detach().sum())
            mx += float(w.max())
            ess += float(1.0 / (w.double().pow(2).sum() * w.numel()) * w.sum() ** 2)
            steps += 1
        hist["adv_loss"].append(tot / n)
        hist["max_weight"].append(mx / max(steps, 1))
        hist["ess"].append(ess / max(steps, 1))
    model.eval()
    return hist


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DONEConfig | None = None,
                    batch_size: int = 1024, **params) -> dict:
    """Clean and PGD accuracy, overall and per class (worst class = the paper's 'weakest' robust accuracy)."""
    cfg = cfg if cfg is not None else DONEConfig(**params)
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    was = model.training
    model.eval()
    clean, rob = [], []
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                clean.append(model(xb).argmax(1) == yb)
            xa = pgd_attack(model, xb, yb, cfg.epsilon, cfg.step_size, cfg.steps, cfg.random_start, cfg.clip, gen)
            with torch.no_grad():
                rob.append(model(xa).argmax(1) == yb)
    finally:
        model.train(was)
    c, r = torch.cat(clean).double(), torch.cat(rob).double()
    classes = torch.unique(y)
    per_class = {int(k): float(r[y == k].mean()) for k in classes}
    return {"clean": float(c.mean()), "robust": float(r.mean()), "per_class_robust": per_class,
            "worst_class_robust": min(per_class.values())}
