"""Load Hugging Face models from local folders (transformers is the optional 'hf' extra)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingDependencyError


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "loading a Hugging Face model", "'weightlab[hf]'") from None
    # weightlab tokenizes whole documents and cuts windows itself; the length warning is noise here
    transformers.utils.logging.get_logger("transformers.tokenization_utils_base").setLevel(40)
    return transformers


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32, local_files_only: bool = True):
    """(model, tokenizer) from an HF folder or a .gguf file; eval mode. Hub names work when local_files_only=False.

    GGUF files and quantized folders (compressed-tensors, GPTQ, AWQ) load as plain dense models:
    weightlab dequantizes them itself, so no GPU kernel package is needed and the result saves
    and trains like any other model.
    """
    tf = transformers_module()
    tf.utils.logging.disable_progress_bar()  # weightlab shows its own progress
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(tf, p, dtype)
    if _is_quantized_folder(p):
        return _load_dequantized(tf, p, dtype)
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot load this folder as a causal LM: {str(e).splitlines()[0]}",
                              path) from None
    return model.eval(), tok


def _plain(tf, config, state_dict: dict, dtype: torch.dtype, where, auto=None):
    """A plain model from ``config`` (its quantization entry removed) holding ``state_dict``."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = (auto or tf.AutoModelForCausalLM).from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"tensors do not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}", where)
    if tied:
        model.tie_weights()
    return model.eval()


def _load_gguf(tf, path: Path, dtype: torch.dtype):
    try:
        src = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(**src)
        # transformers' GGUF loader (dequantize, reverse q/k permutation) in fp32; the model it returns
        # is flagged quantized and refuses save_pretrained, so copy it into a plain one
        g = tf.AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot load this GGUF file: {str(e).splitlines()[0]}", path) from None
    return _plain(tf, g.config, g.state_dict(), dtype, path), tok


def _is_quantized_folder(p: Path) -> bool:
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    from .quantized import detect
    from .reader import _read_json

    return detect(p, _read_json(p / "config.json")) is not None


def _load_dequantized(tf, folder: Path, dtype: torch.dtype, auto=None):
    from .reader import open_checkpoint

    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot read this folder's config/tokenizer: {str(e).splitlines()[0]}",
                              folder) from None
    with open_checkpoint(folder) as ck:
        sd = ck.state_dict(dtype)
    return _plain(tf, config, sd, dtype, folder, auto), tok


def load_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32, local_files_only: bool = True):
    """(model, tokenizer) of an encoder (BERT-like) folder; eval mode. Quantized folders load dense."""
    tf = transformers_module()
    tf.utils.logging.disable_progress_bar()
    if _is_quantized_folder(Path(path).expanduser()):
        return _load_dequantized(tf, Path(path).expanduser(), dtype, tf.AutoModel)
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
        model = tf.AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot load this folder as an encoder: {str(e).splitlines()[0]}",
                              path) from None
    return model.eval(), tok


def load_tokenizer(path: str | os.PathLike, local_files_only: bool = True):
    """The tokenizer of an HF folder (for calibration and evaluation text without loading the model)."""
    tf = transformers_module()
    p = Path(path).expanduser()
    src = (dict(pretrained_model_name_or_path=str(p.parent), gguf_file=p.name) if p.suffix == ".gguf" and p.is_file()
           else dict(pretrained_model_name_or_path=str(path)))
    try:
        return tf.AutoTokenizer.from_pretrained(**src, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers cannot load this folder's tokenizer: {str(e).splitlines()[0]}",
                              path) from None


def load_config(path: str | os.PathLike, local_files_only: bool = True):
    """The transformers config of an HF folder or a .gguf file, without any quantization entry
    (weightlab reads quantized checkpoints dequantized, so the model built from it is a plain one)."""
    tf = transformers_module()
    p = Path(path).expanduser()
    src = (dict(pretrained_model_name_or_path=str(p.parent), gguf_file=p.name) if p.suffix == ".gguf" and p.is_file()
           else dict(pretrained_model_name_or_path=str(path)))
    try:
        config = tf.AutoConfig.from_pretrained(**src, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot read this model's config: {str(e).splitlines()[0]}", path) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
