"""D-Pruner (Zhang et al., "Pruning as a Domain-specific LLM Extractor", NAACL 2024 Findings).

Follows the public code (compressionOrg/D-Pruner: code/general.py, code/src/lomo.py,
code/src/lomo_trainer.py, code/save_model_iterative.py); docs/design.md records every step and quirk.
1. General importance G on the open-domain set (``--calib``): the OBS saliency w^2 / U_jj^2 of a
   block-sequential SparseGPT pass (dpruner_general.py); that pass's pruned model is thrown away.
2. Regularized domain pass on the domain set (the ``domain`` parameter): the whole model is
   fine-tuned with SGD (LOMO), the target matrices' gradients carrying the regularizer term
   2 lambda lr^2 G g^2 / 1000, and the dual importance |t + t^2/2000 + w^3| (t = g w, g still
   multiplied by the fp16 loss scale) is summed over every step (dpruner_domain.py).
3. The mask keeps the highest summed importance per block of in_features/32 input columns
   ("iterative blocking"; or per layer / per row) and is applied to the *original* weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.pruning import layer_mask
from .rules import LayerContext, mask_from_scores


class DPrunerConfig(MethodConfig):
    domain: str = Field(..., description="domain calibration text: wiki or a .txt/.jsonl file "
                                         "(the open-domain set is --calib)")
    lambda_: float = Field(0.1, alias="lambda", ge=0, description="regularization weight (reference: 0.1)")
    lr: float = Field(0.03, ge=0, description="LOMO SGD learning rate of the domain pass (reference: 0.03)")
    epochs: int = Field(5, ge=1, description="passes over the domain set; importance sums over all (reference: 5)")
    batch_size: int = Field(8, ge=1, description="domain sequences per step (reference: 8 per device)")
    warmup: float = Field(0.1, ge=0, description="linear warmup share of the steps, then linear decay to 0")
    clip_grad_norm: float = Field(1.0, ge=0, description="global gradient-norm clip (0: none)")
    grad_scale: float = Field(65536.0, gt=0, description="the fp16 loss scale the reference's gradients carry "
                                                         "into the regularizer and the score (2^16)")
    reg_div: float = Field(1000.0, gt=0, description="divisor of the regularizer term (reference: 1000)")
    second_div: float = Field(2000.0, gt=0, description="divisor of the (g w)^2 term (reference: 2000)")
    cubic: bool = Field(True, description="the reference's + w^3 term inside the absolute value")
    train: bool = Field(True, description="update the weights during the domain pass (the reference); "
                                          "false: score-only on the dense weights")
    group: Literal["block", "layer", "row"] = Field(
        "block", description="block: per group of in_features/blocks input columns (iterative blocking); "
                             "layer: whole matrix (save_model.py); row: per output row")
    blocks: int = Field(32, ge=1, description="column blocks per matrix for group=block (reference: 32)")
    general_sparsity: float = Field(0.5, ge=0, lt=1, description="sparsity of the general SparseGPT pass "
                                                                 "(the reference uses its final sparsity)")
    general_blocksize: int = Field(128, gt=0)
    percdamp: float = Field(0.01, ge=0)
    domain_nsamples: int | None = Field(None, gt=0, description="domain sequences (default: --nsamples)")
    domain_seqlen: int | None = Field(None, gt=1, description="domain sequence length (default: --seqlen)")

    @field_validator("domain")
    @classmethod
    def _domain_exists(cls, v: str) -> str:
        # checked with the other options, before the model is loaded and the general pass runs
        if v not in ("wiki", "zoo:wiki") and not Path(v).is_file():
            raise ValueError(f"domain data '{v}' is neither 'wiki' nor an existing .txt/.jsonl file")
        return v


def block_mask(scores: torch.Tensor, sparsity: float, blocks: int) -> torch.Tensor:
    """Prune floor(sparsity * numel) lowest scores inside each group of ceil(cols / blocks) columns."""
    cols = scores.shape[1]
    width = -(-cols // max(1, min(blocks, cols)))
    mask = torch.ones_like(scores, dtype=torch.bool)
    for i in range(0, cols, width):
        mask[:, i:i + width] = layer_mask(scores[:, i:i + width], sparsity)
    return mask


def prepare(model, layers, cfg: DPrunerConfig, *, tokenizer=None, batches=None, nsamples=32, seqlen=512, seed=0,
            sampling="random", show_progress=None) -> dict:
    """General importance on the open-domain batches, then the regularized domain pass (dense start)."""
    from .dpruner_domain import domain_importance
    from .dpruner_general import general_importance
    from .prune import to_batches

    if not batches:
        raise ConfigError("dpruner needs the open-domain calibration set (--calib)")
    dom = to_batches(cfg.domain, tokenizer, cfg.domain_nsamples or nsamples, cfg.domain_seqlen or seqlen,
                     seed + 1, sampling)
    ids = torch.cat([b["input_ids"] if isinstance(b, dict) else b for b in dom])
    general = None
    if cfg.lambda_ > 0:  # with lambda = 0 the general term vanishes: skip its pass
        general = general_importance(model, layers, batches, sparsity=cfg.general_sparsity,
                                     blocksize=cfg.general_blocksize, percdamp=cfg.percdamp,
                                     show_progress=show_progress)
    scores = domain_importance(model, layers, ids, general, cfg, seed=seed, show_progress=show_progress)
    return {"dpruner": scores}


@register("compress", "dpruner", kind="prune", config=DPrunerConfig, regime=Regime.LAYERWISE,
          prepare=prepare, needs=("data",),
          paper="Pruning as a Domain-specific LLM Extractor (Zhang et al., NAACL 2024 Findings); "
                "reference code compressionOrg/D-Pruner",
          summary="SparseGPT-saliency general importance regularizes an SGD domain pass whose summed "
                  "Taylor scores pick the mask (open domain: --calib, domain: -p domain=FILE)")
def dpruner(ctx: LayerContext):
    S = ctx.extra["dpruner"][ctx.name].to(ctx.weight.device).reshape(ctx.weight.shape)
    cfg = ctx.cfg
    if ctx.nm is None and cfg.group == "block":
        mask = block_mask(S, ctx.sparsity, cfg.blocks)
    else:
        mask = mask_from_scores(S, ctx, "layer" if cfg.group == "block" else cfg.group)
    return ctx.weight * mask, mask
