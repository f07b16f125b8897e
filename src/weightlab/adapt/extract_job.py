"""LoRA extraction, the streaming pass: each changed matrix factored by a truncated SVD (the rank by the
config's rule), saved modules copied, and the PEFT folder written atomically."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine.result import Result
from ..errors import ConfigError
from .extract_plan import Module, changed

if TYPE_CHECKING:
    from .extract import ExtractConfig

LOWRANK_MIN_SIDE = 1024
LOWRANK_OVERSAMPLE = 10
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def choose_rank(s: torch.Tensor, total: float, cfg: ExtractConfig, full: int) -> int:
    """k for singular values ``s`` (descending, possibly only the top ones) of a change with ||D||_F^2 = total."""
    s = s.detach().double().cpu()
    if cfg.energy is not None:
        c = torch.cumsum(s * s, 0)
        hit = torch.nonzero(c >= cfg.energy * total)
        k = int(hit[0]) + 1 if len(hit) else len(s)
    elif cfg.sv_threshold is not None:
        k = int((s > cfg.sv_threshold * s[0]).sum()) if len(s) else 0
    else:
        k = cfg.bound()
    k = min(k, full, len(s), cfg.max_rank or full)
    if cfg.sv_epsilon > 0:
        k = min(k, int((s > cfg.sv_epsilon).sum()))
    return k


def decompose(D: torch.Tensor, cfg: ExtractConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(U, S, Vh, ||D||_F^2, which SVD) with the singular values a rule may keep."""
    from ..tensor.svd import randomized_svd

    full = min(D.shape)
    bound = cfg.bound()
    low = cfg.svd == "lowrank" or (cfg.svd == "auto" and bound is not None and full >= LOWRANK_MIN_SIDE
                                   and 4 * (bound + LOWRANK_OVERSAMPLE) <= full)
    if low and bound is not None and bound < full:
        U, S, Vh = randomized_svd(D, bound, niter=4, oversample=LOWRANK_OVERSAMPLE)
        total = float(torch.linalg.vector_norm(D).double()) ** 2
        return U, S, Vh, total, "randomized"
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    total = float(torch.sum(S.double() ** 2))
    return U, S, Vh, total, "full"


@dataclass
class ExtractResult(Result):
    """What ``extract_lora`` wrote: per LoRA module its rank, kept energy and relative error."""

    path: Path
    rule: str
    r: int
    modules: list[dict]
    saved: list[dict]
    skipped: list[dict]
    unchanged: int
    params: int
    bytes: int
    rel_error: float
    seconds: float
    device: str
    warnings: list[str]

    def ranks(self) -> dict[str, int]:
        return {m["name"]: m["rank"] for m in self.modules}

    def as_dict(self) -> dict:
        return {"path": str(self.path), "rule": self.rule, "r": self.r, "modules": self.modules,
                "modules_to_save": self.saved, "skipped": self.skipped, "unchanged_tensors": self.unchanged,
                "adapter_parameters": self.params, "bytes": self.bytes, "rel_error": self.rel_error,
                "seconds": self.seconds, "device": self.device, "warnings": self.warnings}


class Job:
    def __init__(self, b_src, f_src, b_path, f_path, base_ref, cfg: ExtractConfig, dev, out_dtype, warnings):
        self.b, self.f, self.b_path, self.f_path, self.base_ref = b_src, f_src, b_path, f_path, base_ref
        self.cfg, self.dev, self.out_dtype, self.warnings = cfg, dev, out_dtype, warnings
        self.skipped: list[dict] = []
        self.unchanged = 0

    def release(self, name: str) -> None:
        for s in (self.b, self.f):
            if hasattr(s, "release"):
                s.release(name)

    def changed(self, name: str) -> bool:
        return changed(self.b.get(name), self.f.get(name))

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def small_tensors(self, mods: dict[str, Module]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Biases, norms and every other tensor that is not a matrix to factor, compared first: they decide
        lora_bias and modules_to_save before the matrices are read. -> (bias changes, modules to save)."""
        bias_delta: dict[str, torch.Tensor] = {}
        to_save: dict[str, str] = {}
        for m in mods.values():
            if m.kind in ("embedding", "output"):
                continue  # compared with their matrix
            for leaf, t in m.tensors.items():
                if leaf == "weight" and m.kind != "other":
                    continue
                if not self.changed(t):
                    self.unchanged += 1
                    continue
                if m.role == "lora" and leaf == "bias":
                    if self.cfg.biases == "lora":
                        bias_delta[m.name] = self.f.get(t).float() - self.b.get(t).float()
                    else:
                        self.skip(t, "changed bias (biases='skip')")
                elif m.role == "excluded":
                    self.skip(t, "module not in target_modules")
                elif m.role == "lora":
                    self.skip(t, f"a changed '{leaf}' of a factored module has no place in a LoRA")
                elif m.role == "save":
                    kind = "norm" if "norm" in m.name.rpartition(".")[2].lower() else "module"
                    to_save.setdefault(m.name, f"changed {kind}")
                else:
                    self.skip(t, "a top-level tensor has no module PEFT could save" if not m.name
                              else "changed (undecomposable='skip')" if self.cfg.undecomposable == "skip"
                              else "its module has submodules, so PEFT cannot save it in full")
                self.release(t)
        return bias_delta, to_save

    def run(self, out: Path, mods: dict[str, Module], tied: bool, force: bool, show_progress) -> ExtractResult:
        from ..engine.progress import progress
        from ..io.modelcard import public_name
        from ..io.provenance import Provenance
        from ..io.writer import CheckpointWriter

        cfg = self.cfg
        bias_delta, to_save = self.small_tensors(mods)
        lora_bias = bool(bias_delta)
        if lora_bias and any(m.kind == "embedding" and m.role == "lora" for m in mods.values()):
            raise ConfigError("biases changed, and PEFT has no lora_bias for embedding layers: pass biases='skip' "
                              "(--biases skip) or embeddings='save' (--embeddings save)")
        details = {"rank_rule": cfg.rule()}
        if self.f_path is not None:
            details["fine_tune"] = public_name(str(self.f_path))
        prov = Provenance(method="adapt/extract-lora", params=cfg.model_dump(mode="json"),
                          inputs=[str(self.base_ref)] if self.base_ref is not None else [],
                          card={"base_model_relation": "adapter", "library_name": "peft", "details": details,
                                "usage": "```python\nfrom peft import PeftModel\n"
                                         "model = PeftModel.from_pretrained(base_model, 'THIS_FOLDER')\n```"})
        modules: list[dict] = []
        targets: dict[str, int] = {}
        embed_targets: set[str] = set()
        fifo = False
        err2 = tot2 = 0.0
        params = 0
        mats = [m for m in mods.values() if m.kind != "other" and "weight" in m.tensors]
        writer = CheckpointWriter(out, prefix="adapter_model", max_shard_size=1 << 62, provenance=prov,
                                  inputs=[p for p in (self.b_path, self.f_path) if p is not None], force=force)
        with writer:
            for m in progress(mats, "extract LoRA", enabled=show_progress):
                w = m.tensors["weight"]
                bw, fw = self.b.get(w), self.f.get(w)
                changed_w = changed(bw, fw)
                changed_others = ([t for leaf, t in m.tensors.items() if leaf != "weight" and self.changed(t)]
                                  if m.kind in ("embedding", "output") else [])
                if not changed_w and not changed_others and m.name not in bias_delta:
                    self.unchanged += 1
                    self.release(w)
                    continue
                what = {"embedding": "embedding", "output": "output head"}.get(m.kind, m.kind)
                if m.role == "excluded":
                    self.skip(m.name, "module not in target_modules")
                elif m.role == "skip":
                    self.skip(m.name, f"changed {what} (embeddings='skip')")
                elif m.role == "save":
                    to_save[m.name] = f"changed {what}"
                else:
                    for t in changed_others:
                        self.skip(t, f"a changed bias of an {what} has no place in its LoRA")
                    got = None
                    if changed_w or m.name in bias_delta:
                        got = self.factor(m, bw, fw)
                    if got is not None:
                        rec, e2, d2, A, B = got
                        prefix = f"base_model.model.{m.name}"
                        if m.kind == "embedding":  # PEFT: A (r, vocab), B (dim, r), delta = (B @ A)^T
                            writer.add(f"{prefix}.lora_embedding_A", B.t().contiguous())
                            writer.add(f"{prefix}.lora_embedding_B", A.t().contiguous())
                            embed_targets.add(m.name)
                        else:
                            writer.add(f"{prefix}.lora_A.weight", A)
                            writer.add(f"{prefix}.lora_B.weight", B)
                            fifo = fifo or m.kind == "conv1d"
                        if lora_bias:
                            bd = bias_delta.get(m.name)
                            writer.add(f"{prefix}.lora_B.bias",
                                       (bd if bd is not None else torch.zeros(B.shape[0])).to(B.dtype))
                            rec["bias"] = bd is not None
                            params += B.shape[0]
                        targets[m.name] = rec["rank"]
                        modules.append(rec)
                        params += A.numel() + B.numel()
                        err2 += e2
                        tot2 += d2
                self.release(w)
            if not targets:
                raise ConfigError("the fine-tune does not differ from the base in any matrix that is factored"
                                  + (f" (target_modules {cfg.target_modules!r})" if cfg.target_modules else "")
                                  + "; there is no LoRA to extract")
            saved = []
            for name in sorted(to_save):  # the fine-tune's module in full (PEFT modules_to_save)
                n = 0
                for leaf, t in mods[name].tensors.items():
                    x = self.f.get(t)
                    writer.add(f"base_model.model.{name}.{leaf}", x)
                    n += x.numel()
                    self.release(t)
                params += n
                saved.append({"name": name, "reason": to_save[name], "numel": n})
            r = max(targets.values())
            pattern = {n: k for n, k in sorted(targets.items()) if k != r}
            conf_src = getattr(self.f, "config", None)
            archs = conf_src.get("architectures") if isinstance(conf_src, dict) else None
            causal = isinstance(archs, list) and bool(archs) and str(archs[0]).endswith(("ForCausalLM",
                                                                                      "LMHeadModel"))
            conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
                    "base_model_name_or_path": public_name(str(self.base_ref)) if self.base_ref is not None else None,
                    "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                    "target_modules": sorted(targets), "modules_to_save": sorted(to_save) or None,
                    "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": fifo, "bias": "none",
                    "init_lora_weights": True, "inference_mode": True}
            if lora_bias:
                conf["lora_bias"] = True
            if tied and any(mods[n].kind == "embedding" for n in [*to_save, *embed_targets]):
                self.warnings.append("the model ties its output head to the input embedding, whose change is in the "
                                     "adapter: check that the loaded model's head follows it")
            if self.skipped:
                self.warnings.append(f"{len(self.skipped)} changed tensor(s) or module(s) are not in the adapter "
                                     "(see 'skipped'): " + ", ".join(s["name"] for s in self.skipped[:5])
                                     + (" ..." if len(self.skipped) > 5 else ""))
            if to_save:
                self.warnings.append(f"{len(to_save)} changed module(s) are saved in full (modules_to_save): "
                                     + ", ".join(sorted(to_save)[:5]) + (" ..." if len(to_save) > 5 else ""))
            prov.card["warnings"] = list(self.warnings)
            writer.add_file(PEFT_CONFIG, json.dumps(conf, indent=2) + "\n")
        return ExtractResult(out, cfg.rule(), r, modules, saved, self.skipped, self.unchanged, params,
                             writer.total_size, math.sqrt(err2 / tot2) if tot2 > 0 else 0.0, 0.0, str(self.dev),
                             self.warnings)

    def factor(self, m: Module, bw: torch.Tensor, fw: torch.Tensor):
        """(report row, ||D - B A||^2, ||D||^2, A, B) for one module's change, A and B on the CPU in the output
        dtype; None when sv_epsilon leaves no singular value."""
        from ..engine.device import exact_matmul

        cfg, dev = self.cfg, self.dev
        out_dtype = self.out_dtype or fw.dtype
        D = fw.to(dev, torch.float32) - bw.to(dev, torch.float32)
        if m.kind == "conv1d":
            D = D.t()  # HF Conv1D stores (in, out)
        if not bool(torch.isfinite(D).all()):
            raise ConfigError(f"tensor '{m.tensors['weight']}': the difference has NaN or Inf values (in the base "
                              "or the fine-tune); no adapter was written")
        full = min(D.shape)
        row = {"name": m.name, "kind": m.kind, "shape": list(D.shape), "full_rank": full}
        if not bool(D.any()):  # only the bias changed: a rank-1 zero LoRA carries lora_B.bias
            A, B = torch.zeros(1, D.shape[1], dtype=out_dtype), torch.zeros(D.shape[0], 1, dtype=out_dtype)
            return {**row, "rank": 1, "kept_energy": 1.0, "rel_error": 0.0, "svd": "none"}, 0.0, 0.0, A, B
        with exact_matmul():
            U, S, Vh, total, how = decompose(D, cfg)
            k = choose_rank(S, total, cfg, full)
            if k == 0:
                self.skip(m.name, f"every singular value is <= sv_epsilon ({cfg.sv_epsilon:g})")
                return None
            if cfg.distribute_scale:
                sq = S[:k].sqrt()
                A, B = sq[:, None] * Vh[:k], U[:, :k] * sq
            else:
                A, B = S[:k, None] * Vh[:k], U[:, :k]
            A, B = A.to(out_dtype), B.to(out_dtype)
            err = float(torch.linalg.vector_norm(D - B.float() @ A.float()).double()) ** 2
        kept = float(torch.sum(S[:k].double() ** 2)) / total
        row.update(rank=k, kept_energy=kept, rel_error=math.sqrt(err / total), svd=how)
        return row, err, total, A.cpu().contiguous(), B.cpu().contiguous()
