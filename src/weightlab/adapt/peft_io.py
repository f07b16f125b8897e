"""PEFT interop: write LoRA-shaped adapters as PEFT folders, read PEFT LoRA folders.

Every method exports as a LoRA on the ORIGINAL base weights (``peft_factors``): LoRA as is;
PiSSA and SORSA exactly as rank-2r LoRAs ([B | B0][A ; -A0]); Bone exactly as rank-r
(M^T times the tiled identity); Bat and GradNormLoRP only as an SVD-truncated LoRA when
``svd_rank`` is given (exact when svd_rank >= the rank of their delta). Plain LoRA keeps its
r / lora_alpha / use_rslora; the others are written with the scale folded into B
(r = lora_alpha = R, scale 1), zero-padded to one rank R across layers. DoRA exports as PEFT's DoRA
(``use_dora: true``: lora_A, lora_B and ``lora_magnitude_vector``, the keys PEFT's save_pretrained
writes), and ``import_peft`` reads PEFT DoRA folders as weightlab's ``dora``. Methods with their own
PEFT type ((IA)^3, VeRA, LoHa, LoKr, AdaLoRA) write and read it themselves (``peft_export`` / ``peft_import``,
``peft_type`` in the config): they are not LoRA-shaped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import get_method
from .api import SHARED, _exact, adapter_layers, attach, read_folder

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def _write_peft(entries, out_dir, *, r: int, alpha: float, rslora: bool, fan_in_fan_out: bool,
                base_model: str | None, force: bool, dtype: torch.dtype | None, inputs=(),
                magnitudes: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder
    from ..io.modelcard import public_name

    sd = {}
    for name, B, A in entries:
        if dtype is not None:
            B, A = B.to(dtype), A.to(dtype)
        sd[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        sd[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        if magnitudes is not None:  # PEFT saves the DoRA magnitude without ".weight" (its pre-refactor key)
            mag = magnitudes[name] if dtype is None else magnitudes[name].to(dtype)
            sd[f"base_model.model.{name}.lora_magnitude_vector"] = mag.contiguous()
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(alpha),
            "lora_dropout": 0.0, "use_rslora": bool(rslora), "fan_in_fan_out": bool(fan_in_fan_out),
            "bias": "none", "target_modules": sorted(n for n, _, _ in entries), "init_lora_weights": True,
            # a name, never a local path: the adapter is shared beyond this machine
            "base_model_name_or_path": public_name(base_model) if base_model else None, "inference_mode": True,
            "modules_to_save": None}
    if magnitudes is not None:
        conf["use_dora"] = True
    with AtomicFolder(out_dir, force=force, inputs=inputs) as tmp:
        save_file(sd, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(conf, indent=2))
    return Path(out_dir)


def _write_native(sd, conf, out_dir, *, base_model, force, dtype, inputs=()) -> Path:
    """A PEFT folder of a method's own type (IA3, VERA): its state dict and config as the method wrote them."""
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder
    from ..io.modelcard import public_name

    if dtype is not None:
        sd = {k: v.to(dtype) if k.startswith("base_model.model.") else v for k, v in sd.items()}
    conf = {**conf, "task_type": "CAUSAL_LM", "inference_mode": True,
            "base_model_name_or_path": public_name(base_model) if base_model else None}
    with AtomicFolder(out_dir, force=force, inputs=inputs) as tmp:
        save_file(sd, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(conf, indent=2))
    return Path(out_dir)


def _attach_exact(model, method: str, names: list[str], **cfg) -> dict:
    attach(model, method, targets=_exact(names), **cfg)
    return adapter_layers(model)


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
    lora_shaped = method_name in ("lora", "dora")
    ranks = {t["lora_A"].shape[0] for _, _, t, _, _ in per_layer} if lora_shaped else set()
    if lora_shaped and len(ranks) == 1:
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
    entries, R = _pad_entries(raw, kinds, conv)  # DoRA: s folded into B leaves ||W0 + s B A|| as it was
    return entries, R, float(R), False, fifo


def _magnitudes(method_name: str, per_layer):
    """DoRA's magnitude per layer in PEFT's shape ((out,), Conv2d (1, out, 1, 1)); None for other methods."""
    if method_name != "dora":
        return None
    return {n: t["magnitude"].reshape(1, -1, 1, 1) if k == "conv2d" else t["magnitude"].reshape(-1)
            for n, k, t, _, _ in per_layer}


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
    if hasattr(spec.fn, "peft_export"):  # a PEFT type of its own (IA3, VERA)
        first = next(iter(layers.values()))
        sd, conf = spec.fn.peft_export(spec.make_config(info["config"]), per, first.method.shared)
        return _write_native(sd, conf, out_dir, base_model=base_model, force=force, dtype=dtype)
    entries, r, alpha, rslora, fifo = _entries(spec.name, spec.make_config(info["config"]), per, svd_rank)
    if dtype is None and spec.name not in ("lora", "dora"):
        dtype = next(iter(layers.values())).base_layer.weight.dtype
    return _write_peft(entries, out_dir, r=r, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo,
                       base_model=base_model, force=force, dtype=dtype, magnitudes=_magnitudes(spec.name, per))


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
    if hasattr(spec.fn, "peft_export"):  # a PEFT type of its own (IA3, VERA); VeRA regenerates its projections
        shapes = {n: tuple(conf["shapes"][n]) for n in conf["targets"]}
        shared = spec.fn.prepare_shapes(shapes, cfg) if hasattr(spec.fn, "prepare_shapes") else None
        saved = {k[len(SHARED):]: v for k, v in tensors.items() if k.startswith(SHARED)}
        if shared is not None and saved:  # the saved projections (an imported adapter's need not be the key's)
            meth = spec.fn(cfg)
            meth.shared = shared
            meth.load_shared_state(saved)
        sd, pconf = spec.fn.peft_export(cfg, per, shared)
        return _write_native(sd, pconf, out_dir, base_model=conf.get("base_model"), force=force, dtype=None,
                             inputs=[adapter_dir])
    entries, r, alpha, rslora, fifo = _entries(spec.name, cfg, per, svd_rank)
    dtype = None if spec.name in ("lora", "dora") else tensors[next(iter(tensors))].dtype
    return _write_peft(entries, out_dir, r=r, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo,
                       base_model=conf.get("base_model"), force=force, dtype=dtype, inputs=[adapter_dir],
                       magnitudes=_magnitudes(spec.name, per))


def import_peft(model: nn.Module, adapter_dir) -> nn.Module:
    """Attach a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json) as weightlab LoRA layers.

    A PEFT DoRA folder (``use_dora: true``) becomes weightlab ``dora`` layers with its magnitudes."""
    from safetensors.torch import load_file

    p = Path(adapter_dir)
    if not (p / PEFT_CONFIG).is_file() or not (p / PEFT_WEIGHTS).is_file():
        raise ConfigError(f"'{adapter_dir}' is not a PEFT adapter folder (needs {PEFT_WEIGHTS} and {PEFT_CONFIG})")
    conf = json.loads((p / PEFT_CONFIG).read_text())
    native = {"IA3": "ia3", "VERA": "vera", "LOHA": "loha", "LOKR": "lokr", "ADALORA": "adalora"}
    if conf.get("peft_type") in native:
        try:
            spec = get_method("adapt", native[conf["peft_type"]])
        except ConfigError:
            spec = None
        if spec is not None and hasattr(spec.fn, "peft_import"):
            return spec.fn.peft_import(model, conf, load_file(str(p / PEFT_WEIGHTS)), _attach_exact)
    if conf.get("peft_type") != "LORA":
        raise ConfigError(f"PEFT adapters of type {conf.get('peft_type')} cannot be imported (LORA, "
                          "LORA with use_dora, IA3, VERA, LOHA, LOKR and ADALORA can)")
    method = "dora" if conf.get("use_dora") else "lora"
    sd = load_file(str(p / PEFT_WEIGHTS))
    rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    # DoRA: "X.lora_magnitude_vector" as PEFT saves it; ".weight" or an adapter name after it are accepted
    rx_mag = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = rx.match(k)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = v
        elif method == "dora" and (m := rx_mag.match(k)):
            layers.setdefault(m.group(1), {})["m"] = v
    if not layers:
        raise ConfigError(f"{p / PEFT_WEIGHTS} holds no lora_A/lora_B tensors")
    if method == "dora":
        lacking = sorted(n for n, t in layers.items() if "m" not in t or "A" not in t)
        if lacking:
            raise ConfigError(f"{p / PEFT_WEIGHTS}: a DoRA adapter (use_dora) without lora_magnitude_vector or "
                              f"lora_A for {lacking[:3]}")
    alpha_pat = conf.get("alpha_pattern") or {}
    groups: dict[tuple[int, float], list[str]] = {}
    for n, t in layers.items():
        r = t["A"].shape[0]
        alpha = next((a for key, a in alpha_pat.items() if n == key or n.endswith("." + key)), conf["lora_alpha"])
        groups.setdefault((r, float(alpha)), []).append(n)
    for (r, alpha), names in groups.items():
        attach(model, method, targets=_exact(names), r=r, alpha=alpha, rslora=bool(conf.get("use_rslora")),
               dropout=0.0)
    wrapped = adapter_layers(model)
    with torch.no_grad():
        for n, t in layers.items():
            lay = wrapped[n]
            lay.adapter.lora_A.copy_(t["A"].reshape(lay.adapter.lora_A.shape))
            lay.adapter.lora_B.copy_(t["B"].reshape(lay.adapter.lora_B.shape))
            if method == "dora":
                lay.adapter.magnitude.copy_(t["m"].reshape(-1))
    return model
