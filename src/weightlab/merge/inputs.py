"""The inputs of a merge: opening them (checkpoints, state dicts, model+lora), the tensor each output
tensor reads, and the embedding re-indexing of a tokenizer_source."""
from __future__ import annotations

import os

import torch

from ..engine.source import StateDictSource
from ..errors import ConfigError
from ..io.lora_fold import LoraFolded, split_model_lora
from ..io.reader import open_checkpoint


class MergeInputs:
    """The opened inputs and the tensor plan; what a method's prepare() may read from."""

    def __init__(self, models: list, base, plan, compute_dtype: torch.dtype | None):
        self.models, self.base, self.plan = models, base, plan
        self._dtype = compute_dtype
        self.densities: list[float | None] = [None] * len(models)

    def compute_dtype(self, tp) -> torch.dtype:
        if self._dtype is not None:
            return self._dtype
        ref, ref_name = self.reference(tp)
        itemsize = max([ref.info(ref_name).dtype.itemsize] + [self.models[i].info(s).dtype.itemsize
                                                                for i, s in zip(self.indices(tp), tp.sources)])
        # 16-bit inputs: float32 holds their differences exactly; 32-bit inputs need float64 for that
        return torch.float64 if itemsize >= 4 else torch.float32

    def load(self, i: int, tp) -> torch.Tensor:
        return self.models[i].get(tp.sources[i]).to(self.compute_dtype(tp))

    def load_base(self, tp) -> torch.Tensor | None:
        return None if self.base is None else self.base.get(tp.name).to(self.compute_dtype(tp))

    def merged_plans(self):
        return [tp for tp in self.plan if tp.merged]

    def indices(self, tp):
        """Which opened models feed this tensor (all of them, except in slices)."""
        return tp.models if tp.models is not None else range(len(self.models))

    def reference(self, tp):
        """The input whose tensor sets the output's dtype (and is copied for integer buffers): the base,
        else the first model."""
        if tp.base is not None:
            return self.models[tp.base[0]], tp.base[1]
        if self.base is not None:
            return self.base, tp.name
        return self.models[next(iter(self.indices(tp)))], tp.sources[0]

    def release(self, tp) -> None:
        """Drop the input pages of a finished tensor so resident memory stays at a few tensors."""
        for i, src in zip(self.indices(tp), tp.sources):
            if hasattr(self.models[i], "release"):
                self.models[i].release(src)
        if tp.base is not None and hasattr(self.models[tp.base[0]], "release"):
            self.models[tp.base[0]].release(tp.base[1])
        if self.base is not None and hasattr(self.base, "release"):
            self.base.release(tp.name)

    def label(self, i: int) -> str:
        p = getattr(self.models[i], "path", None)
        return str(p) if p is not None else f"model #{i + 1}"


def as_source(x):
    if isinstance(x, dict):
        return StateDictSource(x)
    if isinstance(x, (str, os.PathLike)):
        return open_checkpoint(x)
    if hasattr(x, "names") and hasattr(x, "get"):
        return x
    raise ConfigError(f"cannot merge a {type(x).__name__}; pass a path, a Checkpoint or a state dict")


def open_model(path: str, lora: str | None = None):
    """A checkpoint, with a PEFT adapter folded in as it is read when ``lora`` is given."""
    src = open_checkpoint(path)
    return LoraFolded(src, lora) if lora else src


def open_spec(spec: str):
    """A path, or mergekit's MODEL+LORA."""
    return open_model(*split_model_lora(spec))


def vocab_plan(job):
    if not job.tokenizer_source:
        return None
    from .tokenizer import VocabPlan

    base = split_model_lora(job.base)[0] if job.base else None
    return VocabPlan(job.tokenizer_source, base, [m.path for m in job.models])


def permute_rows(vocab, job, tensors, base_t):
    """Embedding/LM-head rows of every input in the output vocabulary (tokenizer_source)."""
    keys = [m.path for m in job.models]
    rows = dict(zip(keys, tensors))
    base_key = split_model_lora(job.base)[0] if job.base else None
    if base_t is not None:
        rows[base_key] = base_t
    out = vocab.permute(rows)
    return [out[k] for k in keys], (out[base_key] if base_t is not None else None)
