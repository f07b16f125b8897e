"""Per-sample causal-LM losses, and the data family's reweighters and robust losses inside a training loop.

A data method says what it is by its registered role (its registered kind, ``get_method("data", name).kind``):

- "reweighter": per-sample losses -> weighted loss sum_i w_i L_i (loss-reweight, dro). A sample
  is one sequence; L_i is its mean token cross-entropy over the tokens that carry labels.
- "loss": a criterion on (logits, targets[, sample ids]) (ldr-kl, aldr-kl). A sample is one
  predicted token: the criterion replaces token cross-entropy.

The loop asks the registry for the role, so a data method registered later with one of these
roles works in ``tune`` without changes here. A method whose factory takes ``num_samples`` keeps
per-sample state (ALDR's temperatures) and gets stable sample ids from the data. In
multi-process training reweighters see the global batch; a per-sample state is updated by the
process that saw the sample, and the main process's copy is the one checkpointed.
"""
from __future__ import annotations

import inspect

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import get_method, list_methods

ROLES = ("reweighter", "loss")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per predicted token, (n, L-1) in float32 (0 where the label is -100), and the label mask.

    Same shift and ignore index as transformers' causal-LM loss, so the token mean equals ``model(**b).loss``.
    """
    lg = logits[:, :-1].float()
    tg = labels[:, 1:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(tg.shape), tg != -100


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token loss of each sequence, number of label tokens of each sequence)."""
    ce, mask = token_losses(logits, labels)
    counts = mask.sum(1)
    return ce.sum(1) / counts.clamp_min(1), counts


def resolve(name: str, params: dict | None = None):
    """(spec, params) for a data method with a training role; a strategy name of a reweighter also works.

    ``linupper`` is read as the reweighter whose config has a ``strategy`` field accepting it
    (loss-reweight with strategy=linupper), found through the registry, not a list here.
    """
    params = dict(params or {})
    try:
        spec = get_method("data", name)
    except ConfigError:
        for s in list_methods("data"):
            field = s.config.model_fields.get("strategy")
            if s.kind in ROLES and field is not None and "strategy" not in params:
                try:
                    s.config(strategy=name)
                except Exception:
                    continue
                params["strategy"] = name
                return s, params
        raise
    if spec.kind not in ROLES:
        usable = sorted(s.name for s in list_methods("data") if s.kind in ROLES)
        raise ConfigError(f"data method '{spec.name}' scores samples, it does not weight a training loss; "
                          f"use one of: {', '.join(usable)}")
    return spec, params


class LossWeighting:
    """A data-family reweighter or robust loss applied to one causal-LM batch.

    ``__call__(logits, labels, sample_ids=None, gathered=None)`` returns the loss to backpropagate.
    For multi-process training pass ``gathered=(all_losses, all_counts, rank)``: the weights are
    computed over the global batch (as the loss-reweighting reference does) and the returned loss
    is the global weighted loss, whose gradient reaches only this process's samples.
    """

    def __init__(self, name: str, params: dict | None = None, *, num_samples: int = 0):
        spec, params = resolve(name, params)
        self.name, self.role = spec.name, spec.kind
        cfg = spec.make_config(params)
        kw = {}
        if "num_samples" in inspect.signature(spec.fn).parameters:
            if num_samples < 1:
                raise ConfigError(f"'{spec.name}' keeps a state per training sample and needs stable sample ids; "
                                  "this data has none (use text or prompt/response data loaded by tune)")
            kw["num_samples"] = num_samples
        self.needs_ids = bool(kw)
        self.fn = spec.fn(cfg, **kw)
        self.params = cfg.model_dump(mode="json", by_alias=True)
        self._takes_counts = "counts" in inspect.signature(self.fn.__call__).parameters
        self.last_weights: torch.Tensor | None = None

    def __call__(self, logits, labels, sample_ids=None, gathered=None) -> torch.Tensor:
        if self.role == "loss":
            tg = labels[:, 1:]
            mask = tg != -100
            ids = None
            if self.needs_ids:
                if sample_ids is None:
                    raise ConfigError(f"'{self.name}' needs sample ids in each batch ('sample_ids')")
                ids = sample_ids[:, 1:][mask]
            out = self.fn(logits[:, :-1][mask].float(), tg[mask], ids)
            return out.mean() if out.dim() else out
        losses, counts = sequence_losses(logits, labels)
        if gathered is not None:
            all_losses, all_counts, rank = gathered
            n = losses.shape[0]
            parts = list(all_losses.detach().split(n))
            parts[rank] = losses  # only this process's entries carry the graph
            losses, counts = torch.cat(parts), all_counts
        keep = counts > 0  # a prompt whose response was cut off has no label token
        args = (losses[keep], counts[keep]) if self._takes_counts else (losses[keep],)
        loss = self.fn(*args)
        self.last_weights = getattr(self.fn, "last_weights", None)
        return loss

    def state_dict(self) -> dict:
        sd = self.fn.state_dict() if hasattr(self.fn, "state_dict") else {}
        return {"name": self.name, "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in sd.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"the checkpoint was trained with loss weighting '{state.get('name')}', "
                              f"not '{self.name}'; pass the same --reweight or start over with --no-resume")
        if hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state["state"])
