"""Load Hugging Face models from local folders (transformers is the optional 'hf' extra)."""
from __future__ import annotations

import os

import torch

from ..errors import CheckpointError, MissingDependencyError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "loading a Hugging Face model", "'weightlab[hf]'") from None
    # weightlab tokenizes whole documents and cuts windows itself; the length warning is noise here
    transformers.utils.logging.get_logger("transformers.tokenization_utils_base").setLevel(40)
    return transformers


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32, local_files_only: bool = True):
    """(model, tokenizer) from an HF folder; eval mode. Hub names work when local_files_only=False."""
    tf = _transformers()
    tf.utils.logging.disable_progress_bar()  # weightlab shows its own progress
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot load this folder as a causal LM: {str(e).splitlines()[0]}",
                              path) from None
    return model.eval(), tok


def load_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32, local_files_only: bool = True):
    """(model, tokenizer) of an encoder (BERT-like) folder; eval mode."""
    tf = _transformers()
    tf.utils.logging.disable_progress_bar()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
        model = tf.AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot load this folder as an encoder: {str(e).splitlines()[0]}",
                              path) from None
    return model.eval(), tok


def load_tokenizer(path: str | os.PathLike, local_files_only: bool = True):
    """The tokenizer of an HF folder (for calibration and evaluation text without loading the model)."""
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot load this folder's tokenizer: {str(e).splitlines()[0]}",
                              path) from None
