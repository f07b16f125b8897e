"""Learngene via stage-wise weight sharing (Xia, Zhu, Yang, Geng; IJCAI 2024, arXiv 2404.16897).

1. An ancestry model g (the teacher: a TinyViT trained on labels) is given or trained.
2. An Aux-Net of depth L = sum(n_s) split into S stages: every layer of stage s runs the *same* block
   phi_s (learngene_model.TinyViT with ``stages``). It is trained by distillation from g (DeiT's soft
   KD loss, alpha = 1: labels unused; learngene_train.kd_loss).
3. The learngene is {phi_1..phi_S} plus patch/position embedding, final norm and head: the Aux-Net's
   state dict, S blocks instead of L.
4. ``expand`` builds a descendant of any depth D >= S: an allocation m_1..m_S (sum D, m_s >= 1) gives
   the m_s consecutive layers of stage s each an independent *copy* of phi_s, in stage order; the
   embeddings, final norm and head are copied too (the head only while the label space is the same, as
   the reference's gene_tranfer_1 with load_head). The descendant is a plain TinyViT, trained as usual.

The default allocation is proportional, m_s ~ D n_s / L, largest remainder first, ties to earlier
stages, m_s >= 1 (the paper has no general rule; its D = 12 example [3,3,2,2,2] from [3,3,4,3,3] is
*not* proportional, so ``allocation`` / ``mapping`` can be given explicitly). A mapping is checked
strictly (length D, stage ids in range) and the copy is a strict load: the reference zipped a short
mapping away and loaded with strict=False, leaving layers random.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.result import Result
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .learngene_model import Layout, TinyViT, ViTShape, build, shape_for, unique_params
from .learngene_train import History, Recipe, accuracy, train

PAPER = ("Xia, Zhu, Yang, Geng 2024, Exploring Learngene via Stage-wise Weight Sharing for Initializing "
         "Variable-sized Models (IJCAI 2024, arXiv 2404.16897); reference code AlphaXia/SWS")


class LearngeneConfig(MethodConfig):
    """Reference defaults (AlphaXia/SWS main.py: AdamW, wd 0.05, cosine, min-lr 1e-5, drop-path 0.1,
    alpha 1, tau 1) at the design notes' CPU scale (section 2c: d 64, 4 heads, MLP x2, stages [2,2,2,2],
    teacher 8 layers / 30 epochs, aux 20 epochs). Learning rates and batch 64 are weightlab's for these sizes
    (the reference: 5e-4 at batch 512 for 150 epochs). Aux-Net lr 2e-3: on digits (seed 0) it reached 0.889
    test accuracy vs 0.811 at 1e-3; 4e-3 diverged (0.118, no drop-path); without drop-path 2e-3 gave 0.858.

    ``clip_grad`` 1.0 (global L2 norm, Aux-Net only) is weightlab's, not the reference's (DeiT's --clip-grad is
    off): unclipped, seed 1 collapsed at step 21 of warmup (lr 1e-3) - one gradient of norm 6.4 against
    ~1 before it, then a flat loss of ~0.21 and grad norms ~0.2 for the remaining 420 steps (0.193 test
    accuracy; a shared block's gradient is the sum over its stage's 2 layers). On seeds
    0/1/2 (digits) no clip gave 0.889/0.193/0.842, clip 1.0 gave 0.938/0.942/0.860; other candidates are in
    RESULTS.md (section "Elastic: Learngene"). About a third of the steps are clipped."""

    stages: list[int] = [2, 2, 2, 2]
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    patch: int | None = None  # None: 2x2 for 8x8 images, 4 for sequences
    teacher_depth: int = 8
    teacher_epochs: int = 30
    teacher_lr: float = 1e-3
    epochs: int = 20
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0  # reference 5 of 150 epochs; 2 of 20 here
    min_lr: float = 1e-5
    drop_path: float = 0.1
    batch_size: int = 64
    alpha: float = 1.0
    tau: float = 1.0
    clip_grad: float | None = 1.0  # Aux-Net only; max global grad L2 norm (the reference: DeiT's --clip-grad, off)
    seed: int = 0

    def recipe(self, teacher: bool = False) -> Recipe:
        if teacher:  # the ancestry model's recipe is unchanged (no clipping): its runs did not collapse
            return Recipe(self.teacher_epochs, self.teacher_lr, self.weight_decay, self.warmup_epochs, self.min_lr,
                          self.batch_size, self.alpha, self.tau)
        return Recipe(self.epochs, self.lr, self.weight_decay, self.warmup_epochs, self.min_lr, self.batch_size,
                      self.alpha, self.tau, self.clip_grad)


@dataclass
class LearngeneResult(Result):
    aux: TinyViT
    teacher: TinyViT
    dataset: str
    config: LearngeneConfig
    teacher_acc: float
    aux_acc: float
    teacher_history: History | None = None
    history: History = field(default_factory=History)
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        s = self.aux.shape
        return {"method": "learngene", "dataset": self.dataset, "stages": self.aux.stages,
                "teacher_depth": self.teacher.depth, "teacher_test_acc": self.teacher_acc,
                "aux_test_acc": self.aux_acc, "aux_loss": self.history.loss,
                "learngene_params": learngene_params(s, len(self.aux.stages)),
                "teacher_params": unique_params(self.teacher), "seconds": self.seconds,
                "config": self.config.model_dump()}


def learngene_params(shape: ViTShape, num_stages: int, head: bool = True) -> int:
    """Closed form of the stored learngene: S blocks + embeddings + final norm (+ head)."""
    return num_stages * shape.block_params() + shape.stem_params(head)


def descendant_params(shape: ViTShape, depth: int) -> int:
    return depth * shape.block_params() + shape.stem_params(True)


def _dataset(dataset):
    from ..zoo import load_dataset

    return load_dataset(dataset) if isinstance(dataset, str) else dataset


@register("elastic", "learngene", kind="whole", regime=Regime.WHOLE_MODEL, config=LearngeneConfig, paper=PAPER,
          summary="train an Aux-Net with stage-wise weight sharing by distillation from an ancestry model; its "
                  "S stage blocks (the learngene) initialize descendants of any depth (expand)")
def train_learngene(dataset: Any = "digits", cfg: LearngeneConfig | None = None, *, teacher: TinyViT | None = None,
                    **params) -> LearngeneResult:
    """Train the ancestry model (unless ``teacher`` is given), then the SWS Aux-Net by distillation from it."""
    cfg = cfg or LearngeneConfig(**params)
    data = _dataset(dataset)
    shape = shape_for(data.num_features, data.num_classes, cfg.patch, dim=cfg.dim, heads=cfg.heads,
                      mlp_ratio=cfg.mlp_ratio)
    cfg.recipe()  # a bad recipe fails before any training
    Layout(sum(cfg.stages), list(cfg.stages))  # bad stage lengths fail before the ancestry model trains
    seconds, t_hist = {}, None
    if teacher is None:
        t0 = time.perf_counter()
        teacher = build(shape, cfg.teacher_depth, seed=cfg.seed, drop_path=cfg.drop_path)
        t_hist = train(teacher, data.x_train, data.y_train, cfg.recipe(teacher=True), seed=cfg.seed)
        seconds["teacher"] = time.perf_counter() - t0
    elif teacher.shape.num_classes != data.num_classes:
        raise ConfigError(f"the teacher predicts {teacher.shape.num_classes} classes; {data.name} has "
                          f"{data.num_classes}")
    t0 = time.perf_counter()
    aux = build(shape, sum(cfg.stages), stages=cfg.stages, seed=cfg.seed + 1, drop_path=cfg.drop_path)
    hist = train(aux, data.x_train, data.y_train, cfg.recipe(), seed=cfg.seed + 1, teacher=teacher)
    seconds["aux"] = time.perf_counter() - t0
    return LearngeneResult(aux, teacher.eval(), data.name, cfg, accuracy(teacher, data.x_test, data.y_test),
                           accuracy(aux, data.x_test, data.y_test), t_hist, hist, seconds)


def allocate(stages: list[int], depth: int) -> list[int]:
    """Layers per stage for a depth-``depth`` descendant: proportional to the stage lengths, largest
    remainder first (ties to earlier stages), every stage at least one layer."""
    S, L = len(stages), sum(stages)
    if depth < S:
        raise ConfigError(f"a descendant needs at least one layer per learngene stage: depth {depth} < {S} stages")
    quota = [depth * n / L for n in stages]
    m = [max(1, math.floor(q)) for q in quota]
    while sum(m) < depth:  # the stage furthest below its quota; max() keeps the first of ties
        s = max(range(S), key=lambda i: quota[i] - m[i])
        m[s] += 1
    while sum(m) > depth:  # only after m_s >= 1 pushed the sum over: take from the most over-served
        s = min((i for i in range(S) if m[i] > 1), key=lambda i: (quota[i] - m[i], -i))
        m[s] -= 1
    return m


def layer_mapping(stages: list[int], depth: int, allocation: list[int] | None = None,
                  mapping: list[int] | None = None) -> list[int]:
    """The learngene stage each descendant layer copies (``mapping`` wins over ``allocation``)."""
    S = len(stages)
    if mapping is not None:
        mapping = [int(s) for s in mapping]
        if len(mapping) != depth:
            raise ConfigError(f"the mapping names {len(mapping)} layers; the descendant has depth {depth}")
        bad = [s for s in mapping if not 0 <= s < S]
        if bad:
            raise ConfigError(f"mapping stage id {bad[0]} is unknown: the learngene has stages 0..{S - 1}")
        return mapping
    if allocation is None:
        allocation = allocate(stages, depth)
    allocation = [int(m) for m in allocation]
    if len(allocation) != S or any(m < 1 for m in allocation) or sum(allocation) != depth:
        raise ConfigError(f"allocation {allocation} must give each of the {S} stages >= 1 layer and sum to the "
                          f"depth {depth}")
    return [s for s, m in enumerate(allocation) for _ in range(m)]


def expand(learngene, depth: int, *, allocation: list[int] | None = None, mapping: list[int] | None = None,
           num_classes: int | None = None, keep_head: bool = True, seed: int = 0,
           drop_path: float = 0.0) -> TinyViT:
    """A depth-``depth`` descendant initialised from ``learngene`` (an SWS TinyViT or a learngene folder).

    Layer j is an independent copy of the block of stage ``mapping[j]``; embeddings and the final norm are
    copied; the head too when ``keep_head`` and the label space is the same, else it is freshly initialised
    from ``seed`` like every other weight of a random-init model. The learngene is never modified.
    """
    if not isinstance(learngene, TinyViT):
        from .learngene_io import load_learngene

        learngene = load_learngene(learngene)
    if learngene.stages is None:
        raise ConfigError("expand needs a learngene (an Aux-Net with stages), not a plain model")
    src = learngene.shape
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    m = layer_mapping(learngene.stages, int(depth), allocation, mapping)
    classes = src.num_classes if num_classes is None else int(num_classes)
    shape = ViTShape(src.input_shape, src.patch, src.dim, src.heads, src.mlp_ratio, classes)
    child = build(shape, int(depth), seed=seed, drop_path=drop_path)
    with torch.no_grad():
        for j, s in enumerate(m):
            child.blocks[j].load_state_dict(learngene.blocks[s].state_dict(), strict=True)  # copies
        for name in ("patch_embed", "norm") + (("head",) if keep_head and classes == src.num_classes else ()):
            getattr(child, name).load_state_dict(getattr(learngene, name).state_dict(), strict=True)
        child.pos_embed.copy_(learngene.pos_embed)
    child.learngene_mapping = m  # recorded in the descendant's config.json
    return child.eval()


def copy_layers(model: TinyViT, depth: int, seed: int = 0, drop_path: float = 0.0,
                keep: list[int] | None = None) -> TinyViT:
    """Baseline: a depth-``depth`` model by plain pretrained-layer copying (the paper's Heur-LG style).

    ``keep`` are the layers of ``model`` that are stored (default all L); descendant layer j copies
    keep[floor(j K / D)] (evenly spaced, in order, repeated when D > K), with the embeddings, final norm
    and head. ``keep`` of S evenly spaced layers stores as many blocks as an S-stage learngene.
    """
    if model.stages is not None:
        raise ConfigError("copy_layers takes a plain (unshared) model; use expand for a learngene")
    keep = list(range(model.depth)) if keep is None else [int(k) for k in keep]
    if not keep or any(not 0 <= k < model.depth for k in keep):
        raise ConfigError(f"keep must name layers 0..{model.depth - 1} of the model, got {keep}")
    K = len(keep)
    src = [keep[j * K // depth] for j in range(depth)]
    child = build(model.shape, depth, seed=seed, drop_path=drop_path)
    with torch.no_grad():
        for j, b in enumerate(src):
            child.blocks[j].load_state_dict(model.blocks[b].state_dict(), strict=True)
        for name in ("patch_embed", "norm", "head"):
            getattr(child, name).load_state_dict(getattr(model, name).state_dict(), strict=True)
        child.pos_embed.copy_(model.pos_embed)
    child.learngene_mapping = src
    return child.eval()
