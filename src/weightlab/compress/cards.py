"""Model-card facts of compressed models (quantized, pruned, written as compressed-tensors or dense): the tags,
details, warnings and usage lines that io/provenance writes into each output's README.md."""
from __future__ import annotations

from torch import nn


def sparsity_of(weights) -> dict:
    """Share of zeros and whether every group of 4 consecutive inputs holds at least 2 zeros (2:4)."""
    zeros = total = 0
    two_four = True
    for w in weights:
        z = w == 0
        zeros += int(z.sum())
        total += z.numel()
        if two_four:
            two_four = z.shape[-1] % 4 == 0 and bool((z.reshape(-1, 4).sum(-1) >= 2).all())
    return {"sparsity": zeros / total if total else 0.0, "pattern": "2:4" if two_four and total else None}


USAGE_CT = ("Load with transformers (`pip install compressed-tensors`): "
            "`AutoModelForCausalLM.from_pretrained(path)` (or the AutoModel class of the architecture); "
            "serve with vLLM: `vllm serve path`.")
USAGE_ASYM = ("Load with transformers: `AutoModelForCausalLM.from_pretrained(path, quantization_config="
              "CompressedTensorsConfig(dequantize=True))` (the default loader fails on asymmetric zero points).")


MIN_SPARSITY = 0.05  # fewer exact zeros than this is a dense model (padding rows, dead units), not a pruned one


def sparsity_card(sparsity: float, pattern: str | None) -> dict:
    """Card facts for a pruned model: it is stored dense (zeros kept), the sparsity only recorded."""
    if sparsity < MIN_SPARSITY and pattern != "2:4":
        return {}
    tags = ["2:4-sparse"] if pattern == "2:4" else ["sparse"]
    return {"tags": tags, "details": {"sparsity": round(sparsity, 4), "sparsity_pattern": pattern or "unstructured",
                                      "sparsity_storage": "dense (zeros kept in the weights; sparsity_config {})"}}


def ct_card(summary: dict, config: dict | None = None) -> dict:
    a = summary["weights"]
    causal = any(str(x).endswith("ForCausalLM") for x in (config or {}).get("architectures") or [])
    grid = f"fp{a['num_bits']}" if a.get("type") == "float" else f"int{a['num_bits']}"
    card = {"base_model_relation": "quantized", "library_name": "transformers",
            "pipeline_tag": "text-generation" if causal else None,
            "tags": ["compressed-tensors", summary["scheme"].lower().replace("_", "-"), grid],
            "details": {"format": f"compressed-tensors {summary.get('ct_format', 'pack-quantized')}",
                        "scheme": summary["scheme"], "bits": a["num_bits"], "group_size": a.get("group_size", -1),
                        "strategy": a["strategy"], "symmetric": a["symmetric"],
                        "bits_per_weight": round(summary["bits_per_weight"], 4),
                        "quantized_layers": summary["quantized_layers"], "not_quantized": summary["ignore"],
                        "compressed_tensors_version": summary["compressed_tensors_version"]},
            "warnings": list(summary["warnings"]), "usage": USAGE_CT if a["symmetric"] else USAGE_ASYM}
    if summary.get("input_activations"):
        card["details"]["input_activations"] = summary["input_activations"]
    if summary.get("kv_cache_scheme"):
        card["details"]["kv_cache_scheme"] = summary["kv_cache_scheme"]
    return merge_card(card, sparsity_card(summary["sparsity"], summary["pattern"]))


def merge_card(a: dict, b: dict) -> dict:
    """Card dicts combined: lists concatenated (no duplicates), details merged, other keys from b."""
    out = {**a, **b}
    for k in ("tags", "warnings"):
        out[k] = list(dict.fromkeys([*a.get(k, []), *b.get(k, [])]))
    out["details"] = {**a.get("details", {}), **b.get("details", {})}
    return out


def hf_quant_card(report, sym: bool) -> dict:
    """Card facts of a quantized model written dequantized (--format hf): full size, values on the grid."""
    details = {"format": "hf (dequantized: full-size weights whose values lie on the integer grid)",
               "method": report.method, "bits": report.bits, "group_size": report.group_size, "symmetric": sym,
               "bits_per_weight_if_packed": round(report.bits_per_weight, 4)}
    return {"base_model_relation": "quantized", "library_name": "transformers",
            "tags": [f"int{report.bits}-dequantized"], "details": details}


def prune_card(model: nn.Module, layers: list[dict], causal_lm: bool = True) -> dict:
    """Card facts of a pruned model: measured on the weights written (2:4 checked along the inputs)."""
    from ..engine.calibration import weight_matrix

    mods = dict(model.named_modules())
    s = sparsity_of(weight_matrix(mods[r["name"]]) for r in layers if r["name"] in mods)
    card = sparsity_card(s["sparsity"], s["pattern"])
    if causal_lm:
        card.update(library_name="transformers", pipeline_tag="text-generation")
    return card
