"""A checkpoint with a PEFT LoRA adapter folded in on the fly (mergekit's `model+lora` inputs).

Reading a tensor the adapter targets returns W + scale * B @ A (transposed for fan_in_fan_out layers,
(B @ A)^T for embeddings), computed in float32 and stored back in W's dtype; for a DoRA adapter
(`use_dora`) each output row of that sum is then scaled to its magnitude m (m * V / ||V||_row, as PEFT's
merge does); `modules_to_save` tensors replace the base's. Nothing is written: the merge engine streams through it like any checkpoint.
scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with PEFT's rank_pattern / alpha_pattern.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import ConfigError
from .reader import open_checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_magnitude_vector(?:\.[^.]+)?$")
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.[^.]+)?"
                   r"(?:\.weight)?$")


def _pattern(patterns: dict, module: str, default):
    for key, v in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return v
    return default


class LoraFolded:
    """names()/info()/get() of ``base`` with the adapter at ``adapter_dir`` folded in."""

    def __init__(self, base, adapter_dir):
        self.base = open_checkpoint(base) if isinstance(base, (str, Path)) else base
        self.adapter_dir = Path(adapter_dir)
        self.path = getattr(self.base, "path", None)
        self.config = getattr(self.base, "config", None)
        a = self.adapter_dir
        if not (a / ADAPTER_CONFIG).is_file() or not (a / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"{a} is not a PEFT adapter folder (needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
        conf = json.loads((a / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if conf.get("peft_type") != "LORA":
            raise ConfigError(f"{a}: only LoRA adapters can be folded into a merge input, this one is "
                              f"{conf.get('peft_type')}")
        self._conf = conf
        self._ad = open_checkpoint(a / ADAPTER_WEIGHTS)
        self._pairs: dict[str, dict] = {}  # base tensor name -> {"A", "B", "emb", "module"}
        self._replace: dict[str, str] = {}  # base tensor name -> adapter tensor (modules_to_save)
        names = set(self.base.names())
        unknown = []
        for k in self._ad.names():
            mag = _MAGNITUDE.match(k)
            if mag:
                self._pairs.setdefault(mag["mod"] + ".weight", {"module": mag["mod"], "emb": False})["m"] = k
                continue
            m = _LORA.match(k)
            if m:
                target = m["mod"] + ".weight"
                self._pairs.setdefault(target, {"module": m["mod"], "emb": bool(m["emb"])})[m["ab"]] = k
                continue
            plain = k.removeprefix("base_model.model.")
            plain = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", plain)
            plain = plain.replace(".base_layer.", ".")  # saved base weights (save_embedding_layers)
            if plain in names:
                self._replace[plain] = k
            else:
                unknown.append(k)
        missing = sorted(t for t in self._pairs if t not in names)
        half = sorted(t for t, p in self._pairs.items() if "A" not in p or "B" not in p)
        if unknown or missing or half:
            problems = ([f"tensors for no module of the base: {', '.join(unknown[:5])}"] if unknown else []) + \
                ([f"targets missing from the base: {', '.join(missing[:5])}"] if missing else []) + \
                ([f"lora_A without lora_B (or the reverse): {', '.join(half[:5])}"] if half else [])
            raise ConfigError(f"{a} does not fit {self.path}: " + "; ".join(problems))
        for t, p in self._pairs.items():  # shapes before any tensor is read
            r = self._ad.info(p["A"]).shape[0]
            want = self._delta_shape(p)
            have = tuple(self.base.info(t).shape)
            if (have[0], math.prod(have[1:])) != want:
                raise ConfigError(f"{a}: {t} is {list(self.base.info(t).shape)} in the base, the adapter's "
                                  f"B @ A is {list(want)} (r={r})")

    def _delta_shape(self, p) -> tuple:
        a, b = self._ad.info(p["A"]).shape, self._ad.info(p["B"]).shape
        if p["emb"]:
            return (a[1], b[0])
        shape = (b[0], math.prod(a[1:]))
        return shape[::-1] if self._conf.get("fan_in_fan_out") else shape

    def scale(self, module: str, r: int) -> float:
        r = int(_pattern(self._conf.get("rank_pattern"), module, r))
        alpha = float(_pattern(self._conf.get("alpha_pattern"), module, self._conf.get("lora_alpha", r)))
        return alpha / math.sqrt(r) if self._conf.get("use_rslora") else alpha / r

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str):
        return self.base.info(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._pairs:
            p = self._pairs[name]
            w = self._ad.get(self._replace[name]) if name in self._replace else self.base.get(name)
            A, B = self._ad.get(p["A"]).float(), self._ad.get(p["B"]).float()
            delta = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
            if p["emb"] or self._conf.get("fan_in_fan_out"):
                delta = delta.T
            v = w.float() + self.scale(p["module"], A.shape[0]) * delta.reshape(w.shape)
            if "m" in p:  # DoRA: every output row rescaled to its learned magnitude
                rows = v.T if self._conf.get("fan_in_fan_out") else v
                flat = rows.reshape(rows.shape[0], -1)
                mag = self._ad.get(p["m"]).float().reshape(-1, 1)
                flat = flat * (mag / flat.norm(dim=1, keepdim=True))
                v = flat.reshape(rows.shape).T if self._conf.get("fan_in_fan_out") else flat.reshape(rows.shape)
            t = v.to(w.dtype)
        elif name in self._replace:
            t = self._ad.get(self._replace[name])
        else:
            t = self.base.get(name)
        return t if dtype is None else t.to(dtype)

    def release(self, name: str) -> None:
        if hasattr(self.base, "release"):
            self.base.release(name)

    def close(self) -> None:
        for c in (self.base, self._ad):
            if hasattr(c, "close"):
                c.close()


def split_model_lora(spec: str) -> tuple[str, str | None]:
    """mergekit's `model+lora`: (model, adapter), or (spec, None) when the path exists as written."""
    if "+" not in spec or Path(spec).exists():
        return spec, None
    model, lora = spec.split("+", 1)
    return model, lora
