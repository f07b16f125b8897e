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
O(mn min(m, n)) (not measured here). ``svd="full"`` forces the exact one. The report
gives each module's measured error, with the factors as stored.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from ..errors import ConfigError, OutputExistsError
from ..registry import MethodConfig, Regime, register
from .extract_job import ExtractResult, Job
from .extract_plan import open_source, plan_modules, validate_pair

DEFAULT_RANK = 128  # mergekit-extract-lora's --max-rank default


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
        b_src, b_path, own = open_source(base)
        if own:
            opened.append(b_src)
        f_src, f_path, own = open_source(finetuned)
        if own:
            opened.append(f_src)
        check_not_input(out, [b_path, f_path])
        if out.exists() and not force:
            raise OutputExistsError(f"output '{out}' already exists; pass --force (force=True) to replace it")
        validate_pair(b_src, f_src)
        warnings: list[str] = []
        mods, tied = plan_modules(f_src, f_path, cfg, warnings)
        job = Job(b_src, f_src, b_path, f_path, base if isinstance(base, (str, Path)) else b_path, cfg, dev,
                   out_dtype, warnings)
        res = job.run(out, mods, tied, force, show_progress)
    finally:
        for ck in opened:
            ck.close()
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


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
