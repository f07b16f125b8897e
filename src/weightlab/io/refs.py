"""References to models and text, resolved the same way for every family and command.

Models: a path (folder, .safetensors, .gguf), a Hugging Face cache root (``models--org--name``,
resolved to the snapshot its refs/main names), ``zoo:NAME`` (the offline zoo), or a hub id
``org/name``: taken from the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) without any
network access; only when it is not cached and ``HF_HUB_OFFLINE`` is not set is it downloaded
through huggingface_hub (weights, config and tokenizer files only). Text: ``wiki``
(the zoo's Wikipedia, split calib or heldout), a .txt file, or a .jsonl file with a 'text' field.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import ConfigError

ZOO_MODELS = ("smollm2", "smollm2-bf16", "minilm")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja", "*.gguf"]


def resolve_model(ref: str) -> Path:
    if not ref.startswith("zoo:"):
        p = Path(ref).expanduser()
        if p.exists():
            return _cache_snapshot(p) or p
        if HUB_ID.match(ref):
            return _from_hub(ref)
        return p  # the reader says what is missing
    name = ref[4:]
    from .. import zoo

    if name == "smollm2":
        return zoo.smollm2()
    if name == "smollm2-bf16":
        return zoo.smollm2(dtype="bfloat16")
    if name == "minilm":
        return zoo.minilm()
    raise ConfigError(f"unknown zoo model '{name}'; known: {', '.join('zoo:' + m for m in ZOO_MODELS)}")


def _cache_snapshot(p: Path) -> Path | None:
    """``models--org--name`` (a Hugging Face cache root) -> the snapshot folder refs/main points at."""
    if not (p.is_dir() and p.name.startswith("models--") and (p / "snapshots").is_dir()):
        return None
    ref = p / "refs" / "main"
    if ref.is_file() and (p / "snapshots" / ref.read_text().strip()).is_dir():
        return p / "snapshots" / ref.read_text().strip()
    snaps = sorted((s for s in (p / "snapshots").iterdir() if s.is_dir()), key=lambda s: s.stat().st_mtime)
    if not snaps:
        raise ConfigError(f"{p}: a Hugging Face cache folder with no snapshot")
    return snaps[-1]


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"'{repo_id}' is not a local path; hub ids need huggingface_hub "
                          "(pip install 'weightlab[hf]')") from None
    # read the cache location now (huggingface_hub fixes its constants when first imported)
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_FILES, cache_dir=cache))
    except Exception:  # not in the cache
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise ConfigError(f"'{repo_id}' is neither a local path nor in the Hugging Face cache, and HF_HUB_OFFLINE "
                          "is set; download it first or give the model's folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache))
    except Exception as e:
        raise ConfigError(f"'{repo_id}' is neither a local path nor in the Hugging Face cache, and downloading it "
                          f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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
