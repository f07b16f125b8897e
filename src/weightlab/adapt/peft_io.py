"""PEFT interop: write LoRA-shaped adapters as PEFT folders, read PEFT LoRA folders.

Every method exports as a LoRA on the ORIGINAL base weights (``peft_factors``): LoRA as is;
PiSSA and SORSA exactly as rank-2r LoRAs ([B | B0][A ; -A0]); Bone exactly as rank-r
(M^T times the tiled identity); Bat and GradNormLoRP only as an SVD-truncated LoRA when
``svd_rank`` is given (exact when svd_rank >= the rank of their delta). Plain LoRA keeps its
r / lora_alpha / use_rslora; the others are written with the scale folded into B
(r = lora_alpha = R, scale 1), zero-padded to one rank R across layers. DoRA exports as PEFT's DoRA
(``use_dora: true``: lora_A, lora_B and ``lora_magnitude_vector``, the keys PEFT's save_pretrained
writes), and ``import_peft`` reads PEFT DoRA folders as weightlab's ``dora``. Methods with their own
PEFT type ((IA)^3, VeRA, LoHa, LoKr, AdaLoRA, OFT, BOFT) write and read it themselves (``peft_export`` / ``peft_import``,
``peft_type`` in the config): they are not LoRA-shaped.

Named adapters: ``export_peft(model, out, name=)`` writes one adapter, ``import_peft(model, path, name=)``
attaches a folder under a name, ``import_peft_all`` every adapter of a PEFT ``save_pretrained`` folder
(default at the top, the others in sub-folders named after them). Per-layer r / alpha (weightlab's
``rank_pattern`` / ``alpha_pattern``, or ranks that differ between layers) are written as PEFT's
``rank_pattern`` / ``alpha_pattern``: the adapter's own keys where they reproduce every layer, else the
full module names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import get_method
from .api import (SHARED, _exact, _one, adapter_info, adapter_layers, attach, layer_config, pattern_key,
                  read_folder)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def _write_peft(entries, out_dir, *, r: int, alpha: float, rslora: bool, fan_in_fan_out: bool,
                base_model: str | None, force: bool, dtype: torch.dtype | None, inputs=(),
                magnitudes: dict[str, torch.Tensor] | None = None, rank_pattern: dict | None = None,
                alpha_pattern: dict | None = None) -> Path:
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
            "modules_to_save": None, "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
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


def _attach_exact(model, method: str, names: list[str], *, name: str = "default", **cfg) -> dict:
    """For the methods' ``peft_import``: attach adapter ``name`` on exactly ``names``; a later call with the
    same name adds layers to it (an import attaches one group of layers per (r, alpha))."""
    attach(model, method, targets=_exact(names), name=name, _extend=True, **cfg)
    return {n: _Named(lay, name) for n, lay in adapter_layers(model, name).items()}


class _Named:
    """A layer seen through one named adapter: ``.adapter`` is that adapter's tensors (for ``peft_import``)."""

    def __init__(self, layer, name: str):
        self.layer, self.adapter, self.method = layer, layer.adapter_module(name), layer.methods[name]

    def __getattr__(self, k):
        return getattr(self.layer, k)


def peft_patterns(values: dict[str, float], base, own: dict | None) -> dict:
    """A PEFT pattern dict ({key: value}) giving each layer of ``values`` its value (``base`` where no key
    matches): ``own`` (the adapter's patterns) if it does so with every key used, else the module names."""
    def ok(pat):
        return (all(any(pattern_key([k], n) for n in values) for k in pat) and
                all((pat[k] if (k := pattern_key(pat, n)) is not None else base) == v for n, v in values.items()))

    if all(v == base for v in values.values()):
        return {}
    for cand in (own or {}, {n: v for n, v in values.items() if v != base},
                 {re.escape(n): v for n, v in values.items() if v != base}):
        if cand and ok(cand):
            return dict(cand)
    raise ConfigError(f"no PEFT pattern reproduces the per-layer values {values}")


def _with_patterns(conf: dict, cfg, layer_cfgs: dict, own: tuple[dict | None, dict | None] = (None, None)) -> dict:
    """A native PEFT config with ``rank_pattern`` / ``alpha_pattern`` where the layers' r / alpha differ."""
    fields = type(cfg).model_fields
    if "r" in fields and "rank_pattern" in conf:
        conf["rank_pattern"] = peft_patterns({n: c.r for n, c in layer_cfgs.items()}, cfg.r, own[0])
    if "alpha" in fields and "alpha_pattern" in conf:
        conf["alpha_pattern"] = peft_patterns({n: float(c.alpha) for n, c in layer_cfgs.items()},
                                              float(cfg.alpha), own[1])
    return conf


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


def _entries(method_name: str, cfg, per_layer, svd_rank, layer_cfgs=None, own=(None, None)):
    """per_layer: [(name, kind, tensors, W0 or None, conv_shape)] -> PEFT entries, LoRA hyperparameters and
    the rank / alpha patterns (LoRA and DoRA whose layers differ in r or alpha)."""
    cls = get_method("adapt", method_name).fn
    kinds = {n: k for n, k, *_ in per_layer}
    conv = {n: cs for n, _, _, _, cs in per_layer}
    if len({k for k in kinds.values() if k != "conv2d"}) > 1:
        raise ConfigError("cannot export Linear and Conv1D layers in one PEFT folder (one fan_in_fan_out flag)")
    fifo = "conv1d" in kinds.values()
    lora_shaped = method_name in ("lora", "dora")
    if lora_shaped:
        ranks = {n: t["lora_A"].shape[0] for n, _, t, _, _ in per_layer}
        alphas = {n: float((layer_cfgs or {}).get(n, cfg).alpha) for n in ranks}
        r = cfg.r if cfg.r in ranks.values() else max(set(ranks.values()), key=list(ranks.values()).count)
        rp, ap = peft_patterns(ranks, r, own[0]), peft_patterns(alphas, float(cfg.alpha), own[1])
        entries = []
        for n, k, t, _, cs in per_layer:
            A, B = t["lora_A"], t["lora_B"]
            if k == "conv2d":
                A, B = A.reshape(r, *cs[1:]), B[:, :, None, None]
            entries.append((n, B, A))
        return entries, r, cfg.alpha, cfg.rslora, fifo, rp, ap
    raw = []
    for n, k, t, W0, _ in per_layer:
        B, A = cls.peft_factors(t, cfg, W0, svd_rank)
        raw.append((n, B, A))
    entries, R = _pad_entries(raw, kinds, conv)
    return entries, R, float(R), False, fifo, {}, {}


def _magnitudes(method_name: str, per_layer):
    """DoRA's magnitude per layer in PEFT's shape ((out,), Conv2d (1, out, 1, 1)); None for other methods."""
    if method_name != "dora":
        return None
    return {n: t["magnitude"].reshape(1, -1, 1, 1) if k == "conv2d" else t["magnitude"].reshape(-1)
            for n, k, t, _, _ in per_layer}


def export_peft(model: nn.Module, out_dir, *, svd_rank: int | None = None, force: bool = False,
                base_model: str | None = None, dtype: torch.dtype | None = None, name: str | None = None) -> Path:
    """Write one adapter of the model (``name``; default the only / the active one) as a PEFT folder that
    ``peft.PeftModel.from_pretrained`` loads."""
    if not adapter_layers(model) or getattr(model, "_weightlab_adapter", None) is None:
        raise ConfigError("the model has no adapter attached")
    name = _one(model, name)
    info = adapter_info(model, name)
    layers = adapter_layers(model, name)
    per = []
    for n, m in layers.items():
        if name in m.merged_names:
            raise ConfigError("unmerge the adapter before exporting it")
        with m.using(name):
            W0 = m.method.original_weight(m).detach()
            t = {k: v.detach() for k, v in m.adapter.state_dict().items()}
        per.append((n, m.kind, t, W0, tuple(m.base_layer.weight.shape)))
    spec = get_method("adapt", info["method"])
    cfg = spec.make_config(info["config"])
    layer_cfgs = {n: m.methods[name].cfg for n, m in layers.items()}
    own = (info.get("rank_pattern"), info.get("alpha_pattern"))
    if hasattr(spec.fn, "peft_export"):  # a PEFT type of its own (IA3, VERA)
        first = next(iter(layers.values()))
        sd, conf = spec.fn.peft_export(cfg, per, first.methods[name].shared)
        return _write_native(sd, _with_patterns(conf, cfg, layer_cfgs, own), out_dir, base_model=base_model,
                             force=force, dtype=dtype)
    entries, r, alpha, rslora, fifo, rp, ap = _entries(spec.name, cfg, per, svd_rank, layer_cfgs, own)
    if dtype is None and spec.name not in ("lora", "dora"):
        dtype = next(iter(layers.values())).base_layer.weight.dtype
    return _write_peft(entries, out_dir, r=r, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo,
                       base_model=base_model, force=force, dtype=dtype, magnitudes=_magnitudes(spec.name, per),
                       rank_pattern=rp, alpha_pattern=ap)


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
    own = (conf.get("rank_pattern") or None, conf.get("alpha_pattern") or None)
    layer_cfgs = {n: layer_config(cfg, n, *own) for n in conf["targets"]}
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
        return _write_native(sd, _with_patterns(pconf, cfg, layer_cfgs, own), out_dir, base_model=conf.get("base_model"), force=force, dtype=None,
                             inputs=[adapter_dir])
    entries, r, alpha, rslora, fifo, rp, ap = _entries(spec.name, cfg, per, svd_rank, layer_cfgs, own)
    dtype = None if spec.name in ("lora", "dora") else tensors[next(iter(tensors))].dtype
    return _write_peft(entries, out_dir, r=r, alpha=alpha, rslora=rslora, fan_in_fan_out=fifo,
                       base_model=conf.get("base_model"), force=force, dtype=dtype, inputs=[adapter_dir],
                       magnitudes=_magnitudes(spec.name, per), rank_pattern=rp, alpha_pattern=ap)


def peft_folders(path) -> dict[str, Path]:
    """The adapters of a PEFT ``save_pretrained`` folder by name: "default" at the top, every other adapter
    in a sub-folder named after it."""
    p = Path(path)
    out = {}
    if (p / PEFT_CONFIG).is_file():
        out["default"] = p
    if p.is_dir():
        out.update({d.name: d for d in sorted(p.iterdir()) if d.is_dir() and (d / PEFT_CONFIG).is_file()})
    if not out:
        raise ConfigError(f"'{path}' holds no PEFT adapter ({PEFT_CONFIG}, at the top or in sub-folders)")
    return out


def import_peft_all(model: nn.Module, path) -> list[str]:
    """Attach every adapter of a PEFT ``save_pretrained`` folder under its PEFT name; returns the names."""
    folders = peft_folders(path)
    for n, d in folders.items():
        import_peft(model, d, name=n)
    return list(folders)


def import_peft(model: nn.Module, adapter_dir, name: str = "default") -> nn.Module:
    """Attach a PEFT folder (adapter_model.safetensors + adapter_config.json) as weightlab adapter ``name``.

    LoRA becomes weightlab ``lora`` layers (r / alpha per layer from PEFT's rank_pattern / alpha_pattern), a
    PEFT DoRA folder (``use_dora: true``) ``dora`` layers with its magnitudes, IA3 / VeRA / LoHa / LoKr their
    methods. A folder without adapter files whose sub-folder ``name`` has them (PEFT's layout for a named
    adapter) is read from there."""
    from functools import partial

    from safetensors.torch import load_file

    p = Path(adapter_dir)
    if not (p / PEFT_CONFIG).is_file() and (p / name / PEFT_CONFIG).is_file():
        p = p / name
    if not (p / PEFT_CONFIG).is_file() or not (p / PEFT_WEIGHTS).is_file():
        raise ConfigError(f"'{adapter_dir}' is not a PEFT adapter folder (needs {PEFT_WEIGHTS} and {PEFT_CONFIG})")
    conf = json.loads((p / PEFT_CONFIG).read_text())
    native = {"IA3": "ia3", "VERA": "vera", "LOHA": "loha", "LOKR": "lokr", "ADALORA": "adalora", "OFT": "oft",
              "BOFT": "boft"}
    if conf.get("peft_type") in native:
        try:
            spec = get_method("adapt", native[conf["peft_type"]])
        except ConfigError:
            spec = None
        if spec is not None and hasattr(spec.fn, "peft_import"):
            return spec.fn.peft_import(model, conf, load_file(str(p / PEFT_WEIGHTS)),
                                       partial(_attach_exact, name=name))
    if conf.get("peft_type") != "LORA":
        raise ConfigError(f"PEFT adapters of type {conf.get('peft_type')} cannot be imported (LORA, "
                          "LORA with use_dora, IA3, VERA, LOHA, LOKR, ADALORA, OFT and BOFT can)")
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
    own_r, own_a = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    ranks = {n: int(t["A"].shape[0]) for n, t in layers.items()}  # the tensors decide; PEFT's patterns the alphas
    alphas = {n: float(own_a[k]) if (k := pattern_key(own_a, n)) is not None else float(conf["lora_alpha"])
              for n in layers}
    r0, a0 = int(conf.get("r", 8)), float(conf["lora_alpha"])
    attach(model, method, targets=_exact(list(layers)), name=name, r=r0, alpha=a0,
           rank_pattern=peft_patterns(ranks, r0, own_r) or None, alpha_pattern=peft_patterns(alphas, a0, own_a) or None,
           rslora=bool(conf.get("use_rslora")), dropout=0.0)
    wrapped = adapter_layers(model, name)
    with torch.no_grad():
        for n, t in layers.items():
            ad = wrapped[n].adapter_module(name)
            if ad.lora_A.shape[0] != ranks[n]:
                raise ConfigError(f"{p / PEFT_WEIGHTS}: layer {n} has rank {ranks[n]}, more than its shape "
                                  f"{tuple(wrapped[n].weight_2d().shape)} allows here")
            ad.lora_A.copy_(t["A"].reshape(ad.lora_A.shape))
            ad.lora_B.copy_(t["B"].reshape(ad.lora_B.shape))
            if method == "dora":
                ad.magnitude.copy_(t["m"].reshape(-1))
    return model
