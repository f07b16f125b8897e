"""PEFT interop: write LoRA-shaped adapters as PEFT folders, read PEFT LoRA folders.

Every method exports as a LoRA on the ORIGINAL base weights (``peft_factors``): LoRA as is;
PiSSA and SORSA exactly as rank-2r LoRAs ([B | B0][A ; -A0]); Bone exactly as rank-r
(M^T times the tiled identity); Bat and GradNormLoRP only as an SVD-truncated LoRA when
``svd_rank`` is given (exact when svd_rank >= the rank of their delta). Plain LoRA keeps its
r / lora_alpha / use_rslora; the others are written with the scale folded into B
(r = lora_alpha = R, scale 1), zero-padded to one rank R across layers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import get_method
from .api import _exact, adapter_layers, attach, read_folder

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def _write_peft(entries, out_dir, *, r: int, alpha: float, rslora: bool, fan_in_fan_out: bool,
                base_model: str | None, force: bool, dtype: torch.dtype | None, inputs=()) -> Path:
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder
    from ..io.modelcard import public_name

    sd = {}
    for name, B, A in entries:
        if dtype is not None:
            B, A = B.to(dtype), A.to(dtype)
        sd[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        sd[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(alpha),
            "lora_dropout": 0.0, "use_rslora": bool(rslora), "fan_in_fan_out": bool(fan_in_fan_out),
            "bias": "none", "target_modules": sorted(n for n, _, _ in entries), "init_lora_weights": True,
            # a name, never a local path: the adapter is shared beyond this machine
            "base_model_name_or_path": public_name(base_model) if base_model else None, "inference_mode": True,
            "modules_to_save": None}
    with AtomicFolder(out_dir, force=force, inputs=inputs) as tmp:
        save_file(sd, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(conf, indent=2))
    return Path(out_dir)


def _pad_entries(raw, kinds, conv_shapes):
    """Zero-pad every (B, A) to one rank R; reshape Conv2d factors to PEFT's conv layout."""
    R = max(A.shape[0] for _, B, A in raw)
    out = []
    for name, B, A in raw:
        k = R - A.shape[0]
        if k:
            B = torch.cat([B, B.new_zeros(B.shape[0], k)], 1)
            A = torch.cat([A, A.new_zeros(k, A.shape[1])], 0)
        if kinds.get(name) == "conv2d":
            A = A.reshape(R, *conv_shapes[name][1:])
            B = B[:, :, None, None]
        out.append((name, B, A))
    return out, R


def _entries(method_name: str, cfg, per_layer, svd_rank):
    """per_layer: [(name, kind, tensors, W0 or None, conv_shape)] -> PEFT entries and LoRA hyperparameters."""
    cls = get_method("adapt", method_name).fn
    kinds = {n: k for n, k, *_ in per_layer}
    conv = {n: cs for n, _, _, _, cs in per_layer}
    if len({k for k in kinds.values() if k != "conv2d"}) > 1:
        raise ConfigError("cannot export Linear and Conv1D layers in one PEFT folder (one fan_in_fan_out flag)")
    fifo = "conv1d" in kinds.values()
    ranks = {t["lora_A"].shape[0] for _, _, t, _, _ in per_layer} if method_name == "lora" else set()
    if method_name == "lora" and len(ranks) == 1:
        r = ranks.pop()
        entries = []
        for n, k, t, _, cs in per_layer:
            A, B = t["lora_A"], t["lora_B"]
            if k == "conv2d":
                A, B = A.reshape(r, *cs[1:]), B[:, :, None, None]
            entries.append((n, B, A))
        return entries, r, cfg.alpha, cfg.rslora, fifo
    raw = []
    for n, k, t, W0, _ in per_layer:
        B, A = cls.peft_factors(t, cfg, W0, svd_rank)
        raw.append((n, B, A))
    entries, R = _pad_entries(raw, kinds, conv)
    return entries, R, float(R), False, fifo


def export_peft(model: nn.Module, out_dir, *, svd_rank: int | None = None, force: bool = False,
                base_model: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the model's adapter as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads."""
    layers = adapter_layers(model)
    info = getattr(model, "_weightlab_adapter", None)
    if not layers or info is None:
        raise ConfigError("the model has no adapter attached")
    per = []
    for n, m in layers.items():
        if m.merged:
            raise ConfigError("unmerge the adapter before exporting it")
        W0 = m.method.original_weight(m).detach()
        t = {k: v.detach() for k, v in m.adapter.state_dict().items()}
        per.append((n, m.kind, t, W0, tuple(m.base_layer.weight.shape)))
    spec = get_method("adapt", info["method"])
    entries, r, alpha, rslora, fifo = _entries(spec.name, spec.make_config(info["config"]), per, svd_rank)
    if dtype is None and spec.name != "lora":
        dtype = next(iter(layers.values())).base_layer.weight.dtype
    return _write_peft(entries, out_dir, r=r, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo,
                       base_model=base_model, force=force, dtype=dtype)


def export_folder_peft(adapter_dir, out_dir, *, base: str | None = None, svd_rank: int | None = None,
                       force: bool = False) -> Path:
    """Convert a saved weightlab adapter folder to PEFT. Bat/GradNormLoRP also need ``base`` (its weights)."""
    conf, tensors = read_folder(adapter_dir)
    spec = get_method("adapt", conf["method"])
    cfg = spec.make_config(conf["config"])
    ck = None
    if base is not None:
        from ..io.reader import open_checkpoint
        from ..io.refs import resolve_model

        ck = open_checkpoint(resolve_model(base))
    kinds = conf.get("kinds", {})
    per = []
    for n in conf["targets"]:
        t = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
        out_f, in_f = conf["shapes"][n]
        W0 = None
        if ck is not None:
            w = ck.get(n + ".weight").float()
            w = w.t() if kinds.get(n) == "conv1d" else w.reshape(out_f, -1)
            if spec.name in ("pissa", "sorsa"):
                pass  # exact factors need no base
            W0 = w
        elif spec.name == "bone":
            W0 = torch.empty(out_f, in_f)  # only the shape is used
        per.append((n, kinds.get(n, "linear"), t, W0, tuple(conf.get("conv_shapes", {}).get(n, ()))))
    entries, r, alpha, rslora, fifo = _entries(spec.name, cfg, per, svd_rank)
    dtype = None if spec.name == "lora" else tensors[next(iter(tensors))].dtype
    return _write_peft(entries, out_dir, r=r, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo,
                       base_model=conf.get("base_model"), force=force, dtype=dtype, inputs=[adapter_dir])


def import_peft(model: nn.Module, adapter_dir) -> nn.Module:
    """Attach a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json) as weightlab LoRA layers."""
    from safetensors.torch import load_file

    p = Path(adapter_dir)
    if not (p / PEFT_CONFIG).is_file() or not (p / PEFT_WEIGHTS).is_file():
        raise ConfigError(f"'{adapter_dir}' is not a PEFT adapter folder (needs {PEFT_WEIGHTS} and {PEFT_CONFIG})")
    conf = json.loads((p / PEFT_CONFIG).read_text())
    if conf.get("peft_type") != "LORA":
        raise ConfigError(f"only PEFT LoRA adapters can be imported, this one is {conf.get('peft_type')}")
    if conf.get("use_dora"):
        raise ConfigError("PEFT DoRA adapters are not supported by import_peft")
    sd = load_file(str(p / PEFT_WEIGHTS))
    rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = rx.match(k)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = v
    if not layers:
        raise ConfigError(f"{p / PEFT_WEIGHTS} holds no lora_A/lora_B tensors")
    alpha_pat = conf.get("alpha_pattern") or {}
    groups: dict[tuple[int, float], list[str]] = {}
    for n, t in layers.items():
        r = t["A"].shape[0]
        alpha = next((a for key, a in alpha_pat.items() if n == key or n.endswith("." + key)), conf["lora_alpha"])
        groups.setdefault((r, float(alpha)), []).append(n)
    for (r, alpha), names in groups.items():
        attach(model, "lora", targets=_exact(names), r=r, alpha=alpha, rslora=bool(conf.get("use_rslora")),
               dropout=0.0)
    wrapped = adapter_layers(model)
    with torch.no_grad():
        for n, t in layers.items():
            lay = wrapped[n]
            lay.adapter.lora_A.copy_(t["A"].reshape(lay.adapter.lora_A.shape))
            lay.adapter.lora_B.copy_(t["B"].reshape(lay.adapter.lora_B.shape))
    return model
