"""LoRA extraction, before any tensor is read: open the two models, check they match, and decide what each
module becomes (a LoRA module, a saved module, skipped), from a meta-device skeleton of the config or names."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .extract import ExtractConfig

# names of input-embedding and output-head modules, for checkpoints without a config
EMBED_LEAVES = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                "tok_embeddings", "embed_in", "embed_positions", "shared"}
OUTPUT_LEAVES = {"lm_head", "embed_out", "output"}


@dataclass
class Module:
    name: str  # the model's module name (what PEFT sees)
    kind: str  # linear | conv1d | embedding | output | other
    tensors: dict[str, str] = field(default_factory=dict)  # leaf -> checkpoint tensor name
    role: str = ""  # lora | excluded | save | skip


def open_source(ref):
    """(source, its path or None, opened here)."""
    if all(hasattr(ref, a) for a in ("names", "info", "get")):
        from ..engine.source import root_path

        return ref, root_path(ref), False
    from ..io.reader import open_checkpoint
    from ..io.refs import resolve_model

    path = resolve_model(str(ref))
    return open_checkpoint(path), path, True


def validate_pair(base, ft) -> None:
    """Same names, shapes and kinds of dtype in both, before any tensor is read; every problem in one error."""
    bn, fn = base.names(), ft.names()
    bs, fs = set(bn), set(fn)
    problems = []

    def few(names):
        names = sorted(names)
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if fs - bs:
        problems.append(f"{len(fs - bs)} tensor(s) of the fine-tune are missing from the base: {few(fs - bs)}")
    if bs - fs:
        problems.append(f"{len(bs - fs)} tensor(s) of the base are missing from the fine-tune: {few(bs - fs)}")
    for n in fn:
        if n not in bs:
            continue
        bi, fi = base.info(n), ft.info(n)
        if tuple(bi.shape) != tuple(fi.shape):
            hint = ""
            if len(bi.shape) == 2 and bi.shape[1:] == fi.shape[1:] and bi.shape[0] != fi.shape[0]:
                hint = " (a resized vocabulary? resize the base's embeddings to the fine-tune's first)"
            problems.append(f"tensor '{n}' has shape {tuple(bi.shape)} in the base and {tuple(fi.shape)} in the "
                            f"fine-tune{hint}")
        elif bi.dtype.is_floating_point != fi.dtype.is_floating_point:
            problems.append(f"tensor '{n}' is {bi.dtype} in the base and {fi.dtype} in the fine-tune")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ConfigError("the fine-tune does not match the base, so no LoRA can be extracted:\n  " +
                          "\n  ".join(shown))


def skeleton(path: Path | None):
    """((model key -> module kind, model keys, base_model_prefix, tied embeddings), None) from a meta-device
    model of ``path``'s config, or (None, why not)."""
    if path is None or not (Path(path).is_dir() and (Path(path) / "config.json").is_file()):
        return None, "no config.json"
    try:
        import accelerate

        from ..io.hf import load_config, transformers_module

        tf = transformers_module()
        config = load_config(path)
        with accelerate.init_empty_weights(include_buffers=False):
            try:
                model = tf.AutoModelForCausalLM.from_config(config)
            except (ValueError, KeyError):
                model = tf.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - an architecture transformers cannot build: use the tensor names
        return None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    from .layer import layer_kind

    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    kinds = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            kinds[n] = "embedding"
        elif layer_kind(m) in ("linear", "conv1d"):
            kinds[n] = "output" if head is not None and m is head else layer_kind(m)
        else:
            kinds[n] = "other"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    return (kinds, set(model.state_dict()), getattr(model, "base_model_prefix", "") or "", tied), None


def plan_modules(ft, ft_path, cfg: ExtractConfig, warnings: list[str]) -> tuple[dict[str, Module], bool]:
    """Every module of the fine-tune with its kind and role (lora, excluded, save, skip), from headers only."""
    sk, why = skeleton(ft_path)
    if sk is None:
        kinds, keys, prefix, tied = {}, set(), "", False
        if why != "no config.json":
            warnings.append(f"module types guessed from tensor names (no model skeleton: {why})")
    else:
        kinds, keys, prefix, tied = sk

    def model_key(t: str) -> str:  # checkpoint name -> the model's name (a base-model prefix added or removed)
        if not keys or t in keys:
            return t
        if prefix and f"{prefix}.{t}" in keys:
            return f"{prefix}.{t}"
        if prefix and t.startswith(prefix + ".") and t[len(prefix) + 1:] in keys:
            return t[len(prefix) + 1:]
        return t

    mods: dict[str, Module] = {}
    for t in ft.names():
        mod, _, leaf = model_key(t).rpartition(".")
        mods.setdefault(mod, Module(mod, kinds.get(mod, ""))).tensors[leaf] = t
    for m in mods.values():
        w = m.tensors.get("weight")
        info = ft.info(w) if w else None
        matrix = info is not None and len(info.shape) == 2 and info.dtype.is_floating_point and m.name != ""
        if not m.kind:
            leaf = m.name.rpartition(".")[2]
            m.kind = ("other" if not matrix else "embedding" if leaf in EMBED_LEAVES
                      else "output" if leaf in OUTPUT_LEAVES else "linear")
        elif not matrix:
            m.kind = "other"
    rx = None
    if cfg.target_modules:
        try:
            rx = re.compile(cfg.target_modules)
        except re.error as e:
            raise ConfigError(f"target_modules regex {cfg.target_modules!r} is invalid: {e}") from None
    # PEFT saves a module in full with all of its state dict; a module with submodules (some of them LoRA
    # targets) cannot be one: only leaf modules are saved
    for m in mods.values():
        if m.kind in ("linear", "conv1d"):
            m.role = "lora" if rx is None or rx.fullmatch(m.name) else "excluded"
        elif m.kind in ("embedding", "output"):
            m.role = cfg.embeddings
        else:
            leaf_module = bool(m.name) and not any(n.startswith(m.name + ".") for n in mods)
            m.role = "save" if cfg.undecomposable == "save" and leaf_module else "skip"
    if rx is not None and not any(m.role == "lora" and m.kind in ("linear", "conv1d") for m in mods.values()):
        some = sorted(m.name for m in mods.values() if m.kind in ("linear", "conv1d"))[:4]
        raise ConfigError(f"target_modules {cfg.target_modules!r} matches no Linear/Conv1D module (the whole name "
                          f"must match, as in PEFT; e.g. {', '.join(some) or 'none found'})")
    return mods, tied


def changed(b: torch.Tensor, f: torch.Tensor) -> bool:
    if b.dtype == f.dtype:
        return not torch.equal(b, f)
    if b.is_floating_point():
        return not torch.equal(b.double(), f.double())
    return not torch.equal(b, f.to(b.dtype))
