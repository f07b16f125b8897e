"""README.md model cards: YAML front matter the Hugging Face Hub reads, then how the output was made.

Outputs are shared, so nothing in a card (or in safetensors metadata) may leak the machine it was
made on: local paths become their last component (`public_name`). huggingface_hub writes the
front matter when it is installed (the hf extra); otherwise the same keys are written with pyyaml.
"""
from __future__ import annotations

import os

import yaml


def public_name(value: str) -> str:
    """A local path -> its last component; anything else unchanged."""
    s = str(value)
    if os.path.isabs(s) or s.startswith("~") or (os.sep in s and os.path.exists(s)):
        return os.path.basename(os.path.normpath(os.path.expanduser(s))) or s
    return s


def scrub(obj):
    """``obj`` (JSON-like) with every local path string reduced to its name."""
    if isinstance(obj, str):
        return public_name(obj)
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def base_model_of(inputs) -> list[str]:
    """The inputs' names for ``base_model``. Local folders give their folder name: config.json's
    ``_name_or_path`` is not trusted, as it often names an earlier ancestor (the zoo's MiniLM says
    nreimers/MiniLM-L6-H384-uncased, the model it was fine-tuned from)."""
    return [public_name(str(i)) for i in inputs]


def render(data: dict, body: str) -> str:
    """README.md text: ``---`` YAML ``---`` then ``body``. Empty values are left out."""
    data = {k: v for k, v in data.items() if v not in (None, [], {}, "")}
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n\n" + body
    return str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{body}"))
