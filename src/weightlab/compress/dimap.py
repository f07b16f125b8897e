"""DIMAP: Data-independent Module-aware Pruning (He & Zhou, ICLR 2024, arXiv 2404.13648) as an allocation.

The paper's recipe, in the terms of weightlab's `prune` (an allocation picks how many weights each layer
loses; the magnitude rule then drops that many of the smallest |W| in the layer):

* Weight metric, Sec. 3.2 Eq. 10: sort a layer's weights by magnitude, largest first (p_1, p_2, ...);
  ``Imp(W_pj) = W_pj^2 / sum_{i<=j} W_pi^2``. It comes from the Frobenius distortion bound of Eq. 7-8:
  pruning layer l of a network moves the output by at most ``||W_l - W~_l||_F / ||W_l||_F`` times a
  product that pruning does not change, so each layer's distortion is measured relative to its own energy
  (the ratio is LAMP's score: scale-invariant per layer, 1 for the layer's largest weight).
* Modules, Appendix B and Fig. 3: QKV-M (every block's attention q/k/v matrix), PRJ-M (every block's
  attention output projection), MLP-M (both MLP layers of every block), each spanning *all* blocks of
  *all* stages (``j in [1, J]`` over the whole network; Sec. 4.4: "a module merely has one threshold").
  AUX-M (patch embedding, patch merging, norms) is kept dense (Sec. 4.1: "we keep the AUX-M and prune the
  other three modules").
* Ranking: inside each module, one threshold on Imp over all its layers (one-shot, no data).

What the paper leaves open and weightlab decides (docs/design.md, section DIMAP):
* How much each module loses. The paper reports the share of *all* parameters removed and keeps AUX-M
  dense; weightlab prunes every one of the three modules at the same rate ``r = sparsity * N / N_modules``
  (N: all weights passed in, N_modules: those in QKV-M, PRJ-M and MLP-M), so the model-level sparsity is
  the target, as for the other allocations.
* Swin's ATT-QKV is one fused matrix; checkpoints with separate q/k/v layers (HF Swin, BERT, Llama) have
  the metric computed over the three matrices of a block together, as the paper's fused layer would.
* Layers of other architectures are mapped by name (Llama's gate/up/down into MLP-M, GPT-2's c_attn into
  QKV-M); anything not recognized (heads, embeddings, patch merging, convolutions) is AUX-M.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.pruning import count_fraction, lamp_scores

Weights = dict[str, torch.Tensor]  # layer name -> (out, in) weight

MODULES = ("qkv", "prj", "mlp")  # the pruned modules; everything else is "aux"
# Matched on the end of the layer name; PRJ before MLP, since BERT/Swin's attention.output.dense also ends
# in output.dense (the MLP's second layer there).
_SPLIT_QKV = r"q_proj|k_proj|v_proj|query|key|value"
_PATTERNS = (
    ("qkv", re.compile(rf"(?:^|\.)(?:{_SPLIT_QKV}|qkv|c_attn|query_key_value)$")),
    ("prj", re.compile(r"(?:^|\.)(?:o_proj|out_proj|attn\.proj|attention\.output\.dense|attn\.c_proj|"
                       r"self_attention\.dense|attention\.dense)$")),
    ("mlp", re.compile(r"(?:^|\.)(?:fc1|fc2|gate_proj|up_proj|down_proj|intermediate\.dense|output\.dense|"
                       r"c_fc|mlp\.c_proj|dense_h_to_4h|dense_4h_to_h)$")),
)
_SPLIT = re.compile(rf"(?:^|\.)(?:{_SPLIT_QKV})$")
_STAGE = re.compile(r"(?:^|\.)(?:layers|stages)\.(\d+)\.(?:blocks|downsample)(?:\.|$)")


def module_of(name: str) -> str:
    """'qkv', 'prj', 'mlp' or 'aux' for a layer name (timm/HF Swin, ViT, BERT, Llama, GPT-2 naming)."""
    for module, pat in _PATTERNS:
        if pat.search(name):
            return module
    return "aux"


def stage_of(name: str) -> int | None:
    """The stage of a hierarchical model's layer (``...layers.{s}.blocks...``, ``stages.{s}...``), else None.

    Informational (reports, benchmarks): the paper's modules span all stages."""
    m = _STAGE.search(name)
    return int(m.group(1)) if m else None


def _unit(name: str) -> str:
    """The matrix the metric is computed over: a block's q, k and v together (the paper's fused ATT-QKV)."""
    return _SPLIT.sub(".{qkv}", name) if _SPLIT.search(name) else name


def dimap_scores(weights: Weights) -> dict[str, torch.Tensor]:
    """Eq. 10 for every layer (AUX layers included; they are simply never pruned), float32, layer shapes."""
    units: dict[str, list[str]] = {}
    for n in weights:
        units.setdefault(_unit(n), []).append(n)
    out = {}
    for names in units.values():
        flat = torch.cat([weights[n].detach().reshape(-1).float() for n in names])
        parts = lamp_scores(flat).split([weights[n].numel() for n in names])
        out.update({n: p.view(weights[n].shape) for n, p in zip(names, parts)})
    return out


def module_rate(weights: Weights, sparsity: float) -> float:
    """The share of QKV-M, PRJ-M and MLP-M removed so that ``sparsity`` of all weights goes (AUX-M dense)."""
    total = sum(w.numel() for w in weights.values())
    pruned = sum(w.numel() for n, w in weights.items() if module_of(n) != "aux")
    if pruned == 0:
        raise ConfigError("dimap found no attention (q/k/v, output projection) or MLP layers to prune; "
                          "it keeps every other layer dense (use --allocation lamp for plain layer-adaptive "
                          "magnitude pruning)")
    rate = sparsity * total / pruned
    if rate >= 1:
        raise ConfigError(f"sparsity {sparsity} cannot be reached by dimap: it keeps the auxiliary layers "
                          f"dense and the attention/MLP layers hold only {pruned / total:.1%} of the weights")
    return rate


def _counts(scores: dict[str, torch.Tensor], k: int) -> dict[str, int]:
    """How many of each layer's weights fall among the k lowest scores (ties shared out in layer order)."""
    if k <= 0:
        return {n: 0 for n in scores}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    thr = torch.kthvalue(flat, k).values
    out, need = {}, k - sum(int((s < thr).sum()) for s in scores.values())
    for n, s in scores.items():
        take = min(need, int((s == thr).sum()))
        need -= take
        out[n] = int((s < thr).sum()) + take
    return out


def dimap_counts(weights: Weights, sparsity: float, model_as_module: bool = False) -> dict[str, int]:
    """Weights to remove per layer: the lowest Eq. 10 scores of each module, floor(r * module size) of them.

    ``model_as_module``: the paper's Table 4 ablation - QKV-M, PRJ-M and MLP-M ranked as one module (one
    threshold), AUX-M still dense."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    rate = module_rate(weights, sparsity)
    out = {n: 0 for n in weights}
    groups = [MODULES] if model_as_module else [(m,) for m in MODULES]
    for group in groups:  # one module's scores at a time (a float32 copy of its weights)
        names = [n for n in weights if module_of(n) in group]
        if names:
            size = sum(weights[n].numel() for n in names)
            out.update(_counts(dimap_scores({n: weights[n] for n in names}), int(rate * size)))
    return out


def dimap_masks(weights: Weights, sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks (True = keep) straight from the scores: the k lowest of each layer go, as `prune` does."""
    counts = dimap_counts(weights, sparsity)
    out = {}
    for n, w in weights.items():
        keep = torch.ones(w.numel(), dtype=torch.bool)
        # within a layer (and a fused q/k/v unit) Eq. 10 falls with |W|: the lowest scores are the smallest |W|
        keep[torch.sort(w.detach().abs().reshape(-1).float(), stable=True).indices[:counts[n]]] = False
        out[n] = keep.view(w.shape)
    return out


@register("compress", "dimap", kind="allocate", config=MethodConfig, regime=Regime.STREAMING,
          paper="Data-independent Module-aware Pruning for Hierarchical Vision Transformers (He & Zhou, ICLR 2024); "
                "paper-only (the reference repository holds a README): the per-module rate is weightlab's reading",
          summary="Eq. 10 score (w^2 over the energy of larger weights, q/k/v fused) ranked within QKV, PRJ and "
                  "MLP modules across all stages; auxiliary layers (patch merging, heads) kept dense")
def dimap(weights: Weights, sparsity: float, **_) -> dict[str, float]:
    counts = dimap_counts(weights, sparsity)
    return {n: count_fraction(c, weights[n].numel()) for n, c in counts.items()}
