"""A new adapter from a weighted combination of adapters: PEFT's ``add_weighted_adapter``.

``add_weighted(model, ["a", "b"], [0.7, 0.3], "ab", combination=...)`` adds adapter "ab" (inactive, as in
PEFT: ``set_active`` it). With LoRA adapters (a_i: A_i, B_i, scale s_i = alpha_i / r_i) the rules are PEFT's,
term by term, and the new LoRA has r = alpha = R (scale 1):

- ``linear`` (equal ranks, R = r): A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i. Not
  the weighted sum of the updates (cross terms B_i A_j remain): PEFT calls it "a very rough approximation".
- ``cat`` (R = sum r_i): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], so B A = sum_i w_i s_i B_i A_i
  exactly.
- ``svd`` (R = ``svd_rank`` or max r_i): the best rank-R factors of dW = sum_i w_i dW_i (torch.linalg.svd,
  B = U_R S_R, A = Vh_R; ``svd_clamp``: both clamped to the q-quantile of their entries, as PEFT).

The rank R is PEFT's too: each adapter counts as max(r, its rank_pattern values). Other methods: (IA)^3
adapters combine ``linear`` as PEFT's IA3 (l = sum_i w_i l_i, same feed-forward flags); any other mix of
methods only ``svd``, where dW_i is each adapter's own dense update on the current base (DoRA: its full
update with the magnitude; PEFT would take the LoRA part only), and the result is a LoRA.

Deviation: for rsLoRA inputs PEFT keeps ``use_rslora`` on the new adapter, whose scale then is
R / sqrt(R) = sqrt(R) instead of 1 (the combined update comes out sqrt(R) times too large); weightlab writes
the new adapter without rsLoRA, so its update is the combination above.

``combine_folders`` does the same on LoRA adapter folders (PEFT or weightlab), with no model: the CLI's
``weightlab adapter combine``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .api import (FORMAT, _exact, active_adapters, adapter_info, adapter_layers, adapter_names, attach, pattern_key,
                  set_active)
from .layer import check_adapter_name, rank_of
from .lora import lora_scale

COMBINATIONS = ("svd", "linear", "cat")


# -- the rules on tensors (shared by the model and the folder paths) -------------------------------------
def cat_factors(parts, R: int):
    """parts: [(A (r, in), B (out, r), s, w)] -> A (R, in), B (out, R) zero-padded past sum r_i."""
    A0, B0 = parts[0][0], parts[0][1]
    A, B = A0.new_zeros(R, A0.shape[1]), B0.new_zeros(B0.shape[0], R)
    As = torch.cat([a * w * s for a, _, s, w in parts], 0)  # PEFT's order: (A * weight) * scaling
    Bs = torch.cat([b for _, b, _, _ in parts], 1)
    A[: As.shape[0]] = As
    B[:, : Bs.shape[1]] = Bs
    return A, B


def linear_factors(parts):
    """A = sum sign(ws) sqrt|ws| A_i, B = sum sqrt|ws| B_i (equal ranks), in the factors' dtype."""
    shapes = {tuple(a.shape) for a, *_ in parts}
    if len(shapes) > 1:
        raise ConfigError(f"combination 'linear' needs one rank per layer; the adapters' factors are {sorted(shapes)}")
    wa, wb = [], []
    for _, _, s, w in parts:
        ws = w * s
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on A only, or it would cancel
        wb.append(math.sqrt(abs(ws)))
    dtype, dev = parts[0][0].dtype, parts[0][0].device
    A = (torch.stack([a for a, *_ in parts]) * torch.tensor(wa).to(dev).view(-1, 1, 1)).sum(0)
    B = (torch.stack([b for _, b, *_ in parts]) * torch.tensor(wb).to(dev).view(-1, 1, 1)).sum(0)
    return A.to(dtype), B.to(dtype)


def svd_factors(deltas, weights, R: int, clamp: float | None = None, full_matrices: bool = True,
                driver: str | None = None):
    """Rank-R factors (A = Vh_R, B = U_R S_R) of sum_i w_i dW_i; clamp: PEFT's quantile clamp of both."""
    dW = (torch.stack(deltas) * torch.tensor(weights).to(deltas[0]).view(-1, 1, 1)).sum(0)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=full_matrices, driver=driver)
    B = U[:, :R] @ torch.diag(S[:R])
    A = Vh[:R, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


def _check_request(names, weights, combination, svd_clamp) -> list[float]:
    if not names:
        raise ConfigError("add_weighted needs at least one adapter")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapters to combine are named twice: {names}")
    weights = [float(w) for w in weights]
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"one finite weight per adapter: {len(names)} adapters, weights {weights}")
    if combination not in COMBINATIONS:
        raise ConfigError(f"combination '{combination}' is not one of {', '.join(COMBINATIONS)} "
                          "(PEFT's ties/dare variants are not supported)")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ConfigError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp}")
    return weights


def _peft_rank(cfg: dict, rank_pattern: dict | None) -> int:
    """PEFT's rank of an adapter for add_weighted_adapter: max(r, every rank_pattern value)."""
    return max([int(cfg["r"]), *(int(v) for v in (rank_pattern or {}).values())])


def new_rank(combination: str, ranks: list[int], svd_rank: int | None) -> int:
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination 'linear' needs adapters of one rank (PEFT's rule), got {ranks}; use "
                              "'cat' or 'svd'")
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    if svd_rank is not None and svd_rank < 1:
        raise ConfigError(f"svd_rank must be >= 1, got {svd_rank}")
    if svd_rank is None and not ranks:
        raise ConfigError("combination 'svd' of adapters without a rank needs svd_rank=")
    return svd_rank or max(ranks)


# -- on a model -------------------------------------------------------------------------------
def add_weighted(model: nn.Module, names: list[str], weights: list[float], new_name: str,
                 combination: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                 svd_full_matrices: bool = True, svd_driver: str | None = None) -> nn.Module:
    """Add adapter ``new_name``, the weighted combination of adapters ``names`` (module docstring); in place."""
    check_adapter_name(new_name)
    weights = _check_request(names, weights, combination, svd_clamp)
    infos = {n: adapter_info(model, n) for n in names}
    if new_name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named '{new_name}'; choose another name or delete it")
    layers = adapter_layers(model)
    folded = sorted({a for lay in layers.values() for a in lay.merged_names if a in names})
    if folded:
        raise ConfigError(f"adapters {folded} are folded into the weights: unfold before combining them")
    if len(names) == 1:
        combination = "linear"  # PEFT: one adapter can only be scaled
    methods = {i["method"] for i in infos.values()}
    if methods == {"ia3"}:
        if combination != "linear":
            raise ConfigError(f"(IA)^3 adapters combine 'linear' only (PEFT's IA3 rule), not '{combination}'")
        return _add_ia3(model, names, weights, new_name, infos)
    if methods != {"lora"} and combination != "svd":
        raise ConfigError(f"combination '{combination}' needs LoRA adapters ('linear' also (IA)^3 ones); "
                          f"{sorted(methods)} combine with 'svd' (a LoRA of the weighted sum of their updates)")
    lora = methods == {"lora"}
    ranks = [_peft_rank(i["config"], i.get("rank_pattern")) for i in infos.values() if "r" in i["config"]]
    R = new_rank(combination, ranks, svd_rank)
    union = [n for n, lay in layers.items() if any(a in lay.methods for a in names)]
    if combination == "cat":
        small = [n for n in union if rank_of(R, *layers[n].weight_2d().shape) < R]
        if small:
            raise ConfigError(f"combination 'cat' needs rank {R} but layer {small[0]} has shape "
                              f"{tuple(layers[small[0]].weight_2d().shape)}; use 'svd' with svd_rank=")
    first = infos[names[0]]["config"]
    cfg = {**({k: v for k, v in first.items() if k in ("dropout", "init", "seed")} if lora else {}),
           "r": R, "alpha": float(R), "rslora": False}
    was_active = active_adapters(model)
    attach(model, "lora", targets=_exact(union), name=new_name, _init=False, **cfg)
    with torch.no_grad():
        for n in union:
            lay = layers[n]
            present = [(a, w) for a, w in zip(names, weights) if a in lay.methods]
            ad = lay.adapter_module(new_name)
            if combination == "svd":
                W = lay.weight_2d().detach().float()
                deltas = []
                for a, _ in present:
                    with lay.using(a):
                        deltas.append(lay.method.delta(lay, W).float())
                A, B = svd_factors(deltas, [w for _, w in present], ad.lora_A.shape[0], svd_clamp,
                                   svd_full_matrices, svd_driver)
            else:
                parts = []
                for a, w in present:
                    with lay.using(a):
                        parts.append((lay.adapter.lora_A.data, lay.adapter.lora_B.data, lay.method.scale(lay), w))
                A, B = cat_factors(parts, R) if combination == "cat" else linear_factors(parts)
            ad.lora_A.copy_(A.to(ad.lora_A.dtype))
            ad.lora_B.copy_(B.to(ad.lora_B.dtype))
    set_active(model, was_active)  # the new adapter is added inactive, as in PEFT
    return model


def _add_ia3(model, names, weights, new_name, infos):
    layers = adapter_layers(model)
    union = [n for n, lay in layers.items() if any(a in lay.methods for a in names)]
    for n in union:
        flags = {lay.adapter_module(a).feedforward for lay in [layers[n]] for a in names if a in lay.methods}
        if len(flags) > 1:
            raise ConfigError(f"(IA)^3 layer {n} scales the input in some adapters and the output in others")
    attach(model, "ia3", targets=_exact(union), name=new_name, _init=True, **infos[names[0]]["config"])
    with torch.no_grad():
        for n in union:
            lay = layers[n]
            new = lay.adapter_module(new_name)
            new.feedforward = next(lay.adapter_module(a).feedforward for a in names if a in lay.methods)
            new.ia3_l.zero_()
            for a, w in zip(names, weights):
                if a in lay.methods:
                    new.ia3_l += lay.adapter_module(a).ia3_l * w  # PEFT's running sum
    return model


# -- on adapter folders (no model) ------------------------------------------------------------------
def read_lora_folder(path) -> dict:
    """A LoRA adapter folder, PEFT's or weightlab's, as {"format", "layers": {name: (A 2D, B 2D, scale)},
    "rank", "conf", "a_shapes"} (A (r, in*kh*kw), B (out, r); ``a_shapes`` the stored A shapes)."""
    from safetensors.torch import load_file

    from .api import read_folder
    from .peft_io import PEFT_CONFIG, PEFT_WEIGHTS

    p = Path(path)
    if (p / PEFT_CONFIG).is_file() and (p / PEFT_WEIGHTS).is_file():
        conf = json.loads((p / PEFT_CONFIG).read_text())
        if conf.get("format") is None:
            if conf.get("peft_type") != "LORA" or conf.get("use_dora"):
                raise ConfigError(f"{p}: a PEFT {conf.get('peft_type')}{' DoRA' if conf.get('use_dora') else ''} "
                                  "adapter; folders combine as LoRA only (load other adapters on the base model "
                                  "and use weightlab.adapt.add_weighted)")
            sd = load_file(str(p / PEFT_WEIGHTS))
            fac: dict[str, dict] = {}
            for k, v in sd.items():
                for which in ("A", "B"):
                    tail = f".lora_{which}.weight"
                    if k.endswith(tail):
                        fac.setdefault(k[: -len(tail)].removeprefix("base_model.model."), {})[which] = v
            ap = conf.get("alpha_pattern") or {}
            out = {}
            for n, t in fac.items():
                if set(t) != {"A", "B"}:
                    raise ConfigError(f"{p / PEFT_WEIGHTS}: layer {n} lacks lora_{'A' if 'A' not in t else 'B'}")
                r = t["A"].shape[0]
                alpha = ap[k] if (k := pattern_key(ap, n)) is not None else conf["lora_alpha"]
                out[n] = (t["A"].reshape(r, -1), t["B"].reshape(t["B"].shape[0], r),
                          lora_scale(float(alpha), r, bool(conf.get("use_rslora"))))
            return {"format": "peft", "layers": out, "conf": conf, "rank": _peft_rank(conf, conf.get("rank_pattern")),
                    "a_shapes": {n: tuple(t["A"].shape) for n, t in fac.items()}}
    conf, tensors = read_folder(p)
    if conf["method"] != "lora":
        raise ConfigError(f"{p}: a weightlab {conf['method']} adapter; folders combine as LoRA only (load other "
                          "adapters on the base model and use weightlab.adapt.add_weighted)")
    c, ap = conf["config"], conf.get("alpha_pattern") or {}
    out = {}
    for n in conf["targets"]:
        A, B = tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]
        alpha = ap[k] if (k := pattern_key(ap, n)) is not None else c["alpha"]
        out[n] = (A, B, lora_scale(float(alpha), A.shape[0], bool(c.get("rslora"))))
    return {"format": "weightlab", "layers": out, "conf": conf, "rank": _peft_rank(c, conf.get("rank_pattern")),
            "a_shapes": {n: tuple(tensors[f"{n}.lora_A"].shape) for n in conf["targets"]}}


def combine_folders(paths: list, weights: list[float], out_dir, *, combination: str = "svd",
                    svd_rank: int | None = None, svd_clamp: float | None = None, fmt: str | None = None,
                    force: bool = False) -> dict:
    """``add_weighted`` on LoRA adapter folders: the combination written as a new folder (``fmt`` "peft" or
    "weightlab"; default: the first input's), atomically. Returns a small report."""
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder
    from .api import ADAPTER_FILE, CONFIG_FILE
    from .lora import LoraConfig
    from .peft_io import _write_peft, peft_patterns

    weights = _check_request([str(p) for p in paths], weights, combination, svd_clamp)
    ins = [read_lora_folder(p) for p in paths]
    fmt = fmt or ins[0]["format"]
    if fmt not in ("peft", "weightlab"):
        raise ConfigError(f"output format '{fmt}': peft or weightlab")
    if len(ins) == 1:
        combination = "linear"
    R = new_rank(combination, [f["rank"] for f in ins], svd_rank)
    names = list(dict.fromkeys(n for f in ins for n in f["layers"]))
    outs = {}
    for n in names:
        present = [(f["layers"][n], w) for f, w in zip(ins, weights) if n in f["layers"]]
        shapes = {(A.shape[1], B.shape[0]) for (A, B, _), _ in present}
        if len(shapes) > 1:
            raise ConfigError(f"layer {n}: the adapters were trained on different shapes {sorted(shapes)}")
        in_f, out_f = shapes.pop()
        Rl = rank_of(R, out_f, in_f)
        if combination == "svd":
            A, B = svd_factors([s * (B.float() @ A.float()) for (A, B, s), _ in present], [w for _, w in present],
                               Rl, svd_clamp)
        elif Rl < R:
            raise ConfigError(f"combination '{combination}' needs rank {R} but layer {n} is {out_f}x{in_f}")
        else:
            parts = [(A, B, s, w) for (A, B, s), w in present]
            A, B = cat_factors(parts, R) if combination == "cat" else linear_factors(parts)
        outs[n] = (A.to(present[0][0][0].dtype).contiguous(), B.to(present[0][0][0].dtype).contiguous())
    ranks = {n: A.shape[0] for n, (A, _) in outs.items()}
    rp = peft_patterns(ranks, R, None)
    src = {n: next(f for f in ins if n in f["layers"]) for n in names}
    if fmt == "peft":
        entries = []
        for n, (A, B) in outs.items():
            a_shape = src[n]["a_shapes"][n]
            if len(a_shape) == 4:  # PEFT's Conv2d factors
                A, B = A.reshape(A.shape[0], *a_shape[1:]), B[:, :, None, None]
            entries.append((n, B, A))
        c0 = ins[0]["conf"]
        fifo = bool(c0.get("fan_in_fan_out")) if ins[0]["format"] == "peft" else "conv1d" in c0.get("kinds", {}).values()
        base = c0.get("base_model_name_or_path") if ins[0]["format"] == "peft" else c0.get("base_model")
        _write_peft(entries, out_dir, r=R, alpha=float(R), rslora=False, fan_in_fan_out=fifo, base_model=base,
                    force=force, dtype=None, inputs=list(paths), rank_pattern=rp)
    else:
        if any(f["format"] != "weightlab" for f in ins):
            raise ConfigError("a weightlab adapter folder is written from weightlab inputs only (layer kinds and "
                              "shapes come from them); write PEFT with fmt='peft'")
        conf = {"format": FORMAT, "version": 1, "method": "lora", "name": "default",
                "config": LoraConfig(r=R, alpha=float(R)).model_dump(mode="json"), "rank_pattern": rp,
                "alpha_pattern": {}, "targets": sorted(outs), "base_model": ins[0]["conf"].get("base_model"),
                "shapes": {n: src[n]["conf"]["shapes"][n] for n in outs},
                "kinds": {n: src[n]["conf"].get("kinds", {}).get(n, "linear") for n in outs},
                "conv_shapes": {n: src[n]["conf"]["conv_shapes"][n] for n in outs
                                if n in src[n]["conf"].get("conv_shapes", {})}}
        sd = {f"{n}.{k}": t for n, (A, B) in outs.items() for k, t in (("lora_A", A), ("lora_B", B))}
        with AtomicFolder(out_dir, force=force, inputs=list(paths)) as tmp:
            save_file(sd, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "weightlab.method": "lora"})
            (tmp / CONFIG_FILE).write_text(json.dumps(conf, indent=1))
    return {"combination": combination, "rank": R, "layers": len(outs), "format": fmt, "weights": weights}
