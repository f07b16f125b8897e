"""LoRA extraction from a fine-tune (``mergekit-extract-lora``): the low-rank part of (fine-tune - base),
written as a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained(base_model, folder)`` loads.

Streamed: one tensor pair at a time from the two checkpoints (memory-mapped), never both models.
For each weight matrix the change D = W_ft - W_base is formed in float32 on the device and
factored by a truncated SVD, D ~ U_k S_k Vh_k. Eckart-Young-Mirsky: no rank-k matrix is closer to
D in Frobenius norm, and the error is the norm of the dropped singular values.

The rank k per module (mergekit: ``--max-rank N``, default 128, plus an absolute ``--sv-epsilon``):

- ``rank=N``: k = min(N, min(out, in)) (mergekit's ``--max-rank``);
- ``energy=F``: the smallest k whose singular values hold a share F of ||D||_F^2;
- ``sv_threshold=F``: the singular values above F times the largest;
- ``max_rank`` bounds every rule, ``sv_epsilon`` drops singular values <= eps (absolute, mergekit's).

Factors as mergekit writes them: A = sqrt(S_k) Vh_k and B = U_k sqrt(S_k) (``distribute_scale``;
without it A = S_k Vh_k, B = U_k), lora_alpha = r per module (scale 1, rank_pattern/alpha_pattern for
the modules below the largest rank), stored in the fine-tune's dtype unless ``dtype`` is given.

What is not a matrix of a Linear (or HF Conv1D):

- input embeddings and the output head (``embeddings``): "save" (default, as mergekit without
  ``--embed-lora``) writes the fine-tune's module in full under ``modules_to_save``; "lora"
  factors them too (``lora_embedding_A/B`` for an nn.Embedding, a plain LoRA for the head);
  "skip" leaves them out with a warning;
- norms and other tensors (``undecomposable``): "save" (default, mergekit) or "skip" (mergekit's
  ``--skip-undecomposable``), with a warning;
- the bias of a factored Linear (``biases``): "lora" writes its change as PEFT's ``lora_B.bias``
  (``lora_bias: true``; zeros for the other modules), "skip" leaves it out with a warning.
  (mergekit writes ``lora_B.bias`` without setting ``lora_bias``, so PEFT drops it.)

Unlike mergekit, only what changed is written: an unchanged matrix is no LoRA module, an unchanged
norm or embedding is not saved. Module types come from a meta-device skeleton of the fine-tune's
config (nn.Embedding, nn.Linear, HF Conv1D) and from tensor names where there is no config.

SVD: ``torch.linalg.svd`` (exact; the energy and threshold rules need every singular value) unless
the kept rank is bounded (``rank`` or ``max_rank``) and small against a large matrix (the shorter
side >= 1024 and rank + 10 <= side / 4): then a randomized SVD (Halko et al., 10 oversamples, 4
power iterations, a seeded generator so reruns are identical) costs O(mn(k+10)) instead of
O(mn min(m, n)), about 10-30x less on LLM matrices. ``svd="full"`` forces the exact one. The report
gives each module's measured error, with the factors as stored.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError, model_validator

from ..engine.result import Result
from ..errors import ConfigError, OutputExistsError
from ..registry import MethodConfig, Regime, register

DEFAULT_RANK = 128  # mergekit-extract-lora's --max-rank default
LOWRANK_MIN_SIDE = 1024
LOWRANK_OVERSAMPLE = 10
# names of input-embedding and output-head modules, for checkpoints without a config
EMBED_LEAVES = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                "tok_embeddings", "embed_in", "embed_positions", "shared"}
OUTPUT_LEAVES = {"lm_head", "embed_out", "output"}
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


class ExtractConfig(MethodConfig):
    rank: int | None = Field(None, ge=1, description="fixed rank per module (mergekit's --max-rank); the default "
                                                     f"when no rule is given: max_rank, else {DEFAULT_RANK}")
    energy: float | None = Field(None, gt=0, le=1, description="keep the singular values that hold this share of "
                                                               "the change's squared Frobenius norm")
    sv_threshold: float | None = Field(None, ge=0, lt=1, description="keep the singular values above this "
                                                                     "fraction of the largest")
    sv_epsilon: float = Field(0.0, ge=0, description="also drop singular values <= this (absolute; mergekit's "
                                                     "--sv-epsilon)")
    max_rank: int | None = Field(None, ge=1, description="upper bound on every module's rank")
    target_modules: str | None = Field(None, description="regex over module names (whole name, as PEFT): the "
                                                         "matrices factored (default: every Linear/Conv1D)")
    embeddings: Literal["save", "lora", "skip"] = Field("save", description="changed embeddings and output head: "
                                                        "save in full (modules_to_save), lora, or skip")
    undecomposable: Literal["save", "skip"] = Field("save", description="changed norms and other tensors: save "
                                                                        "the module in full, or skip")
    biases: Literal["lora", "skip"] = Field("lora", description="changed biases of factored modules: PEFT "
                                                                "lora_B.bias (lora_bias), or skip")
    svd: Literal["auto", "full", "lowrank"] = Field("auto", description="full (torch.linalg.svd), lowrank "
                                                    "(randomized; needs rank or max_rank) or auto")
    distribute_scale: bool = Field(True, description="sqrt(S) on both factors (else S on A)")
    dtype: str | None = Field(None, description="dtype of the written tensors (default: the fine-tune's)")
    device: str = Field("auto", description="where the differences and SVDs are computed")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank", "energy", "sv_threshold") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one rank rule, not {' and '.join(given)} (max_rank bounds any of them)")
        if self.svd == "lowrank" and self.rank is None and self.max_rank is None and given:
            raise ValueError("svd='lowrank' needs a rank bound: rank or max_rank")
        return self

    def bound(self) -> int | None:
        """The largest rank any module can get (None: the matrix's own)."""
        if self.rank is not None:
            return min(self.rank, self.max_rank or self.rank)
        if self.energy is None and self.sv_threshold is None:
            return self.max_rank or DEFAULT_RANK
        return self.max_rank

    def rule(self) -> str:
        if self.energy is not None:
            r = f"energy {self.energy:g}"
        elif self.sv_threshold is not None:
            r = f"singular values > {self.sv_threshold:g} x the largest"
        else:
            r = f"rank {self.bound()}"
        if self.max_rank is not None and (self.energy is not None or self.sv_threshold is not None):
            r += f", at most {self.max_rank}"
        if self.sv_epsilon:
            r += f", singular values > {self.sv_epsilon:g}"
        return r


class ExtractStepConfig(ExtractConfig):
    base: str = Field(..., description="the base model the adapter applies to: a path or zoo:NAME")
    name: str = Field("lora", description="the adapter folder's name inside the recipe's output")


def make_config(params: dict) -> ExtractConfig:
    try:
        return ExtractConfig(**params)
    except ValidationError as e:
        from ..configfile import describe_validation_error

        raise ConfigError(f"invalid LoRA extraction options: {describe_validation_error(e)}") from None


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


def _decompose(D: torch.Tensor, cfg: ExtractConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
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
class _Module:
    name: str  # the model's module name (what PEFT sees)
    kind: str  # linear | conv1d | embedding | output | other
    tensors: dict[str, str] = field(default_factory=dict)  # leaf -> checkpoint tensor name
    role: str = ""  # lora | excluded | save | skip


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


def _open(ref):
    """(source, its path or None, opened here)."""
    if all(hasattr(ref, a) for a in ("names", "info", "get")):
        from ..engine.source import root_path

        return ref, root_path(ref), False
    from ..io.reader import open_checkpoint
    from ..io.refs import resolve_model

    path = resolve_model(str(ref))
    return open_checkpoint(path), path, True


def _validate(base, ft) -> None:
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


def _skeleton(path: Path | None):
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


def _plan(ft, ft_path, cfg: ExtractConfig, warnings: list[str]) -> tuple[dict[str, _Module], bool]:
    """Every module of the fine-tune with its kind and role (lora, excluded, save, skip), from headers only."""
    sk, why = _skeleton(ft_path)
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

    mods: dict[str, _Module] = {}
    for t in ft.names():
        mod, _, leaf = model_key(t).rpartition(".")
        mods.setdefault(mod, _Module(mod, kinds.get(mod, ""))).tensors[leaf] = t
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


def _changed(b: torch.Tensor, f: torch.Tensor) -> bool:
    if b.dtype == f.dtype:
        return not torch.equal(b, f)
    if b.is_floating_point():
        return not torch.equal(b.double(), f.double())
    return not torch.equal(b, f.to(b.dtype))


def extract_lora(base, finetuned, out, *, rank: int | None = None, energy: float | None = None,
                 sv_threshold: float | None = None, sv_epsilon: float = 0.0, max_rank: int | None = None,
                 target_modules: str | None = None, embeddings: str = "save", undecomposable: str = "save",
                 biases: str = "lora", svd: str = "auto", distribute_scale: bool = True, dtype=None,
                 device: str = "auto", force: bool = False, show_progress: bool | None = None) -> ExtractResult:
    """Write the low-rank part of (``finetuned`` - ``base``) as a PEFT LoRA folder at ``out``.

    ``base``/``finetuned``: paths, zoo:NAME or tensor sources (a Checkpoint). The rank per module is
    ``rank``, or chosen by ``energy`` / ``sv_threshold`` (bounded by ``max_rank``); see the module
    docstring for the rest. Options, device, the output path, tensor names and shapes are all checked
    before a tensor is read; the folder appears only when complete.
    """
    from ..engine.device import resolve_device
    from ..io.atomic import check_not_input
    from ..io.dtypes import parse_dtype

    t0 = time.perf_counter()
    cfg = make_config(dict(rank=rank, energy=energy, sv_threshold=sv_threshold, sv_epsilon=sv_epsilon,
                           max_rank=max_rank, target_modules=target_modules, embeddings=embeddings,
                           undecomposable=undecomposable, biases=biases, svd=svd, distribute_scale=distribute_scale,
                           dtype=None if dtype is None else str(dtype).removeprefix("torch."), device=device))
    dev = resolve_device(cfg.device)
    try:
        out_dtype = parse_dtype(dtype) if dtype is not None else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(out).expanduser()
    opened = []
    try:
        b_src, b_path, own = _open(base)
        if own:
            opened.append(b_src)
        f_src, f_path, own = _open(finetuned)
        if own:
            opened.append(f_src)
        check_not_input(out, [b_path, f_path])
        if out.exists() and not force:
            raise OutputExistsError(f"output '{out}' already exists; pass --force (force=True) to replace it")
        _validate(b_src, f_src)
        warnings: list[str] = []
        mods, tied = _plan(f_src, f_path, cfg, warnings)
        job = _Job(b_src, f_src, b_path, f_path, base if isinstance(base, (str, Path)) else b_path, cfg, dev,
                   out_dtype, warnings)
        res = job.run(out, mods, tied, force, show_progress)
    finally:
        for ck in opened:
            ck.close()
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


class _Job:
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
        return _changed(self.b.get(name), self.f.get(name))

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def small_tensors(self, mods: dict[str, _Module]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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

    def run(self, out: Path, mods: dict[str, _Module], tied: bool, force: bool, show_progress) -> ExtractResult:
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
                changed_w = _changed(bw, fw)
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

    def factor(self, m: _Module, bw: torch.Tensor, fw: torch.Tensor):
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
            U, S, Vh, total, how = _decompose(D, cfg)
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


@register("adapt", "extract-lora", kind="report", config=ExtractStepConfig, regime=Regime.STREAMING,
          paper="mergekit-extract-lora (Arcee AI, mergekit/scripts/extract_lora.py); Eckart-Young-Mirsky truncated "
                "SVD of the fine-tuning change",
          summary="the low-rank part of (model - base) as a PEFT LoRA adapter, rank per layer fixed or by energy / "
                  "singular-value threshold; changed norms and embeddings in modules_to_save", workdir=True)
def extract_step(source, cfg: ExtractStepConfig, workdir: Path, show_progress: bool | None = None) -> dict:
    """Recipe step: the model as the previous steps left it, against ``base``, as an adapter in the output."""
    name = cfg.name
    if not name or Path(name).name != name:
        raise ConfigError(f"extract-lora step: name '{name}' must be a plain folder name")
    res = extract_lora(cfg.base, source, workdir / name, force=True, show_progress=show_progress,
                       **cfg.model_dump(exclude={"base", "name"}))
    rep = res.as_dict()
    rep["path"] = name  # relative to the recipe's output, where the runner puts it
    return {**rep, "artifacts": {name: workdir / name}}
