"""compressed-tensors output of a sequential run: each block converted by the library as it is written.

``sequential_writer(ck)`` gives run_sequential two hooks. ``on_block_written`` hands the block's
integer layers to ``deploy.to_compressed_tensors`` on a holder module made of just those Linears
(the library packs them and weightlab checks every code, as for a whole model), so the packed
tensors replace the dense weights before they reach the writer. ``on_finish`` writes config.json's
``quantization_config`` (with the Linears that were not quantized, e.g. lm_head, in ``ignore``) and
the model card from totals over all blocks. Nothing but one block's layers is held at a time.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from .cards import ct_card
from .deploy import to_compressed_tensors


class _BlockView:
    """The source checkpoint seen through one block's finished tensors (what to_compressed_tensors reads)."""

    def __init__(self, ck, tensors: dict, quantized: dict):
        self.ck, self.tensors, self.quantized = ck, tensors, quantized
        self.config, self.path = ck.config, ck.path

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str):
        return self.ck.info(name)

    def get(self, name: str) -> torch.Tensor:
        if name.removesuffix(".weight") in self.quantized and name.endswith(".weight"):
            return self.ck.get(name)  # sparsity is measured on the weights before quantization
        return self.tensors[name]


def _holder(codes: dict) -> nn.Module:
    """A module tree with one bias-free Linear per quantized layer, under the layer's own name."""
    root = nn.Module()
    for name, q in codes.items():
        if not hasattr(q, "codes"):  # an attention module's KV-cache ranges: no Linear of its own
            continue
        parent = root
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        out_f, in_f = q.codes.shape
        parent.add_module(leaf, nn.Linear(in_f, out_f, bias=False, device="meta"))
    return root


def sequential_writer(ck, act=None) -> dict:
    """``on_block_written`` / ``on_finish`` hooks for compress.sequential.run_sequential (``act``: the
    activations.ActScheme of W8A8/FP8 and KV-cache quantization, or None)."""
    acc = {"config": None, "summary": None, "bits": 0.0, "numel": 0, "zeros": 0.0, "total": 0, "two_four": True,
           "quantized": set()}

    def on_block_written(i, name, tensors, codes):
        if not codes:
            return tensors
        out, config, summary = to_compressed_tensors(codes, _holder(codes), _BlockView(ck, tensors, codes), act)
        acc["config"] = acc["config"] or config
        acc["summary"] = acc["summary"] or summary
        n = summary["quantized_weights"]
        acc["bits"] += summary["bits_per_weight"] * n
        acc["numel"] += n
        acc["zeros"] += summary["sparsity"] * n
        acc["total"] += n
        acc["two_four"] &= summary["pattern"] == "2:4"
        acc["quantized"].update(n for n, q in codes.items() if hasattr(q, "codes"))
        return out

    def on_finish(model: nn.Module):
        config, summary = acc["config"], dict(acc["summary"] or {})
        if config is None:
            return {}, {}
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in acc["quantized"])
        config["quantization_config"]["ignore"] = ignore
        summary.update(ignore=ignore, quantized_layers=len(acc["quantized"]), quantized_weights=acc["numel"],
                       bits_per_weight=acc["bits"] / acc["numel"], sparsity=acc["zeros"] / acc["total"],
                       pattern="2:4" if acc["two_four"] else None)
        acc["summary"] = summary
        files = {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
        return files, ct_card(summary, config)

    return {"on_block_written": on_block_written, "on_finish": on_finish}
