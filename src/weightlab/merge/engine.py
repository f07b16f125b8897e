"""The merge engine (tensor streaming regime).

Never builds a model: for each tensor name it reads that tensor from every input, converts
to the compute dtype, applies the method's per-tensor rule and hands the result to the
atomic sharded writer. ``threads`` workers read and merge the next tensors concurrently;
results are written in plan order. Peak memory is a few tensors per input. Integer buffers are copied from the base, never averaged.

Devices: rules registered ``device_capable`` (TIES, TSV-M, R-TSVM: sorting/selection and SVDs)
compute on ``job.device`` when it is an accelerator; each tensor travels there in its stored dtype,
is widened on the device, and the merged tensor comes back to the CPU for the writer. Reading,
writing, the TIES global-threshold pass and every other rule stay on the CPU (they are I/O bound).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.progress import progress
from ..errors import ConfigError, TensorValueError
from ..io.dtypes import parse_dtype
from ..io.provenance import Provenance
from ..io.reader import Checkpoint
from ..io.writer import CheckpointWriter, parse_size
from ..registry import get_method
from .checks import check_per_tensor, count_check, slice_checks
from .context import TensorContext
from .inputs import MergeInputs, as_source, open_model, open_spec, permute_rows, vocab_plan
from .job import MergeJob
from .params import TensorParams
from .slices import plan_slices, relayer_config
from .validate import plan_tensors


@dataclass
class MergeResult:
    output: Path | None
    state_dict: dict[str, torch.Tensor] | None
    report: dict = field(default_factory=dict)


def run_merge(job: MergeJob, out: str | os.PathLike | None = None, *, force: bool = False,
              show_progress: bool | None = None, models=None, base=None) -> MergeResult:
    """Run a merge. ``models``/``base`` may override the job's paths with opened sources or state dicts."""
    spec = get_method("merge", job.method)
    device = _device(spec, job.device)  # before opening anything: an unavailable device is one clear error
    if getattr(spec.contract, "job_runner", None):  # whole-model merges with their own loop (greedy soup)
        return spec.contract.job_runner(job, spec.make_config(job.params), out, force, show_progress)
    if spec.kind != "merge":
        raise ConfigError(f"merge/{spec.name} is not a per-tensor merge rule; call it from Python "
                          f"(weightlab.merge.{spec.fn.__name__})")
    params = TensorParams(spec, job)  # unknown parameters are an error before any input is opened
    cfg = params.cfg or params.config("", 0.0)
    if params.static and spec.contract.check is not None:  # before any input is opened or any output exists
        spec.contract.check(cfg, [m.weight for m in job.models], [m.density for m in job.models])
    if job.slices:
        slice_checks(spec, job)
    else:
        count_check(spec, len(models) if models is not None else len(job.models),
                     base is not None or job.base is not None)
    try:
        parse_size(job.max_shard_size)  # a bad shard size is one error now, not after streaming
    except ValueError as e:
        raise ConfigError(f"max_shard_size: {e}") from None
    out_dtype = _dtype(job.dtype, "dtype")
    cdtype = None if job.compute_dtype == "auto" else _dtype(job.compute_dtype, "compute_dtype")
    srcs = [as_source(m) for m in models] if models is not None else [open_model(m.path, m.lora) for m in job.models]
    layer_from, vocab = None, None
    if job.slices:
        if job.tokenizer_source:
            raise ConfigError("tokenizer_source with slices is not supported yet; merge with models, or give every "
                              "input the same vocabulary")
        base_src = None  # the base is one of each slice's sources, read from there
        plan, layer_from = plan_slices(job, srcs, job.base)
    else:
        base_src = as_source(base) if base is not None else (open_spec(job.base) if job.base else None)
        if spec.contract.requires_base and base_src is None:
            raise ConfigError(f"merge method '{spec.name}' needs a base model (the common starting point)")
        vocab = vocab_plan(job)
        plan = plan_tensors(srcs, base_src, [m.name_map for m in job.models],
                            vocab.is_embedding if vocab is not None else None)
    if not params.static:
        check_per_tensor(spec, job, params, plan)
    inputs = MergeInputs(srcs, base_src, plan, cdtype)
    inputs.densities = [m.density for m in job.models]
    paths = [str(p) for s in [*srcs, base_src] if s is not None
             for p in (getattr(s, "path", None), getattr(s, "adapter_dir", None)) if p]

    writer = None
    if out is not None:
        ref = base_src if base_src is not None else srcs[0]
        template = getattr(ref, "path", None) if isinstance(getattr(ref, "base", ref), Checkpoint) else None
        prov = Provenance(method=f"merge/{spec.name}", params=job.model_dump(), inputs=paths)
        writer = CheckpointWriter(out, template=template, provenance=prov, inputs=paths, force=force,
                                  max_shard_size=job.max_shard_size, dtype=out_dtype)
        if layer_from is not None:
            writer.config_edits.append(relayer_config(layer_from))
        if vocab is not None:
            writer.config_edits.append(vocab.config_edit)
            for fname, content in vocab.files().items():
                writer.add_file(fname, content)
    t0 = time.perf_counter()
    try:
        state = spec.contract.prepare(inputs, cfg) if spec.contract.prepare else {}
        result, bad = _stream(spec, params, job, inputs, state, writer, out_dtype, show_progress, device, vocab)
        if bad:
            raise TensorValueError(f"NaN/Inf in {len(bad)} input tensor(s): {', '.join(bad[:8])}"
                                   + (" ..." if len(bad) > 8 else "")
                                   + "; fix the inputs or pass allow_nonfinite (--allow-nonfinite)")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    report = {"method": spec.name, "tensors": len(plan), "merged": sum(tp.merged for tp in plan),
              "copied_from_base": sum(not tp.merged for tp in plan), "seconds": round(time.perf_counter() - t0, 3),
              "device": str(device) if device is not None else "cpu"}
    return MergeResult(writer.out if writer else None, None if writer else result, report)


def _finite(t: torch.Tensor) -> bool:
    # one reduction first: far cheaper than isfinite() on every element, and exact when it passes
    return not t.is_floating_point() or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _device(spec, name: str | None) -> torch.device | None:
    """The accelerator a device-capable rule computes on, or None for the CPU.

    'auto' means the CPU for rules that are not device-capable; naming an accelerator for one of
    them is an error rather than a silent CPU run. MPS has no float64 (the compute dtype of 32-bit
    inputs), so 'auto' stays on the CPU there and an explicit 'mps' is refused.
    """
    from ..engine.device import resolve_device
    from ..engine.placement import float64_device, on_device

    name = (name or "cpu").strip().lower()
    if name == "cpu":
        return None
    if not getattr(spec.contract, "device_capable", False):
        if name == "auto":
            return None
        resolve_device(name)  # a missing device is reported as such first
        capable = ", ".join(s.name for s in _device_capable_rules())
        raise ConfigError(f"merge/{spec.name} runs on the CPU (it is bound by reading and writing); --device "
                          f"applies to {capable}")
    dev = float64_device(name)
    return dev if on_device(dev) else None


def _device_capable_rules():
    from ..registry import REGISTRY

    return [s for s in REGISTRY.list("merge") if s.contract.device_capable]


def _stream(spec, params: TensorParams, job, inputs: MergeInputs, state, writer, out_dtype, show_progress,
            device=None, vocab=None):
    plan = inputs.plan
    static = params.static
    weights = [m.weight for m in job.models] if static else None
    densities = [m.density for m in job.models] if static else None
    raw = spec.contract.raw_inputs
    result: dict[str, torch.Tensor] = {}
    bad: list[str] = []

    def work(tp):
        """Read one tensor from every input, check it, merge it; runs in a worker thread."""
        ref, ref_name = inputs.reference(tp)
        dt = out_dtype or ref.info(ref_name).dtype
        if not tp.merged:
            return (ref.get(ref_name) if writer is not None else ref.get(ref_name).clone()), []
        tensors = [inputs.models[i].get(src) for i, src in zip(inputs.indices(tp), tp.sources)]
        if tp.base is not None:
            base_t = inputs.models[tp.base[0]].get(tp.base[1])
        else:
            base_t = inputs.base.get(tp.name) if inputs.base is not None else None
        if vocab is not None and vocab.is_embedding(tp.name, ref.info(ref_name).shape):
            tensors, base_t = permute_rows(vocab, job, tensors, base_t)
        if device is not None:  # in the stored dtype (fewer bytes over the bus); widened below on the device
            tensors = [t.to(device) for t in tensors]
            base_t = base_t.to(device) if base_t is not None else None
        if not job.allow_nonfinite:
            nonfinite = [f"{tp.name} ({inputs.label(i)})" for i, t in zip(inputs.indices(tp), tensors)
                         if not _finite(t)]
            if base_t is not None and not _finite(base_t):
                nonfinite.append(f"{tp.name} (base)")
            if nonfinite:
                return None, nonfinite
        if bad:  # the run already failed: only keep scanning for more bad tensors
            return None, []
        if not tensors:  # a slice whose only source is the base: nothing to merge into it
            return base_t.to(dt).cpu(), []
        cdtype = inputs.compute_dtype(tp)
        if static:
            ctx = TensorContext(tp.name, params.cfg, weights, densities, job.seed, state, cdtype, dt)
        else:
            vals = [params.model_values(r, own, tp.t, tp.slice_params)
                    for r, own in zip(tp.refs or job.models, tp.sources)]
            ctx = TensorContext(tp.name, params.config(tp.name, tp.t, tp.slice_params), [v[0] for v in vals],
                                [v[1] for v in vals], job.seed, state, cdtype, dt, [v[2] for v in vals])
        if not raw:
            tensors = [t.to(cdtype) for t in tensors]
            base_t = base_t.to(cdtype) if base_t is not None else None
        return spec.fn(tensors, base_t, ctx).to(dt).cpu(), []

    # Workers read *and* merge different tensors at once, each op single-threaded: on a few
    # cores this beats one tensor at a time with intra-op threads (bincount, selection and
    # Python overhead do not parallelise inside an op). Results are written in plan order.
    pool = ThreadPoolExecutor(max_workers=job.threads) if job.threads > 0 else None
    futures = {}
    lookahead = max(1, job.threads)
    torch_threads = torch.get_num_threads()
    if pool is not None and job.threads > 1:
        torch.set_num_threads(max(1, torch_threads // job.threads))
    try:
        for k, tp in enumerate(progress(plan, f"merge/{spec.name}", enabled=show_progress)):
            if pool is not None:
                for j in range(k, min(k + lookahead, len(plan))):
                    if j not in futures:
                        futures[j] = pool.submit(work, plan[j])
                merged, nonfinite = futures.pop(k).result()
            else:
                merged, nonfinite = work(tp)
            if nonfinite or bad:
                bad += nonfinite
                continue  # keep scanning so every bad tensor is listed at once
            if writer is not None:
                writer.add(tp.name, merged)
            else:
                result[tp.name] = merged
            del merged
            inputs.release(tp)
    finally:
        if pool is not None:
            for f in futures.values():
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
    return result, bad


def _dtype(name, what):
    if name is None:
        return None
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
