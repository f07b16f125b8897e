"""`describe(path)`: what `weightlab info` reports about a checkpoint, as a plain dict."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .deployed import quantization_of
from .dtypes import dtype_name
from .provenance import Provenance
from .reader import open_checkpoint

CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def describe(path: Path) -> dict:
    """Everything `weightlab info` reports, as a plain dict."""
    with open_checkpoint(path) as ck:
        infos = ck.infos()
        by_dtype: Counter = Counter()
        for i in infos:
            by_dtype[dtype_name(i.dtype)] += i.numel
        cfg = ck.config or {}
        prov = Provenance.from_metadata(ck.metadata)
        # quantized folders: logical weights, not packed int32 words, count as parameters
        quant = quantization_of(ck.raw or ck) or ck.quantization
        if quant and quant["format"] == "weightlab-packed":
            cfg = cfg.get("original_config", cfg)  # its config.json is fenced off from transformers
        return {
            "path": str(ck.path),
            "format": quant["format"] if quant else ck.format,
            "container": ck.format,
            "quantization": quant,
            "architecture": cfg.get("architectures", [ck.architecture])[0] if cfg.get("architectures") else
            ck.architecture,
            "num_tensors": len(infos),
            "num_parameters": quant.get("parameters", ck.num_parameters) if quant else ck.num_parameters,
            "size_bytes": sum(i.nbytes for i in infos),
            "dtypes": dict(by_dtype),
            "files": [str(f.name) for f in ck.files],
            "config": {k: cfg[k] for k in CONFIG_KEYS if k in cfg},
            "made_by": None if prov is None else {"method": prov.method, "params": prov.params,
                                                  "inputs": prov.inputs},
            "tensors": [i.as_dict() for i in infos],
        }
