"""References to models and text, resolved the same way for every family and command.

Models: a path (folder, .safetensors, .gguf) or ``zoo:NAME`` (the offline zoo). Text: ``wiki``
(the zoo's Wikipedia, split calib or heldout), a .txt file, or a .jsonl file with a 'text' field.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

ZOO_MODELS = ("smollm2", "smollm2-bf16", "minilm")


def resolve_model(ref: str) -> Path:
    if not ref.startswith("zoo:"):
        return Path(ref).expanduser()
    name = ref[4:]
    from .. import zoo

    if name == "smollm2":
        return zoo.smollm2()
    if name == "smollm2-bf16":
        return zoo.smollm2(dtype="bfloat16")
    if name == "minilm":
        return zoo.minilm()
    raise ConfigError(f"unknown zoo model '{name}'; known: {', '.join('zoo:' + m for m in ZOO_MODELS)}")


def load_text(source: str, split: str = "calib") -> str:
    """'wiki' (the zoo's Wikipedia; split calib or heldout), a .txt file, or a .jsonl file with a 'text' field."""
    if source in ("wiki", "zoo:wiki"):
        from ..zoo import wiki_text

        return wiki_text("calib" if split == "calib" else "heldout")
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"calibration/evaluation data '{source}' is neither 'wiki' nor an existing file")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ConfigError(f"{p}:{i}: each JSONL line needs a string field 'text'")
            texts.append(obj["text"])
        return "\n\n".join(texts)
    return p.read_text(encoding="utf-8")
