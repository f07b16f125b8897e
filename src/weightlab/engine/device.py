"""One device and precision policy for every computing path.

``resolve_device("auto")`` is the first accelerator (CUDA, then MPS) or the CPU; an explicit
device that does not exist is one clear ``ConfigError`` before any work. ``resolve_dtype``
picks the forward dtype: the model's own on an accelerator (bf16 where supported, else fp16),
fp32 on the CPU (the reference the tests compare against). Statistics always accumulate in
fp32 (``STAT_DTYPE``) and solvers run in the precision each method states, with TF32 off
inside them (``exact_matmul``): a Hessian built with TF32 products loses ~3 decimal digits.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import ConfigError

STAT_DTYPE = torch.float32
DEVICE_HELP = "auto (first accelerator, else cpu), cpu, cuda, cuda:N or mps"
DTYPE_HELP = "forward dtype: auto (model's dtype on an accelerator, fp32 on the CPU), bf16, fp16 or fp32"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A ``torch.device`` for 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; ConfigError if it does not exist here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    s = (spec or "auto").strip().lower()
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _has_mps() else torch.device("cpu")
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}; use {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA device is available on this machine "
                              "(torch was built without CUDA or no GPU is visible); use --device cpu or auto")
        n = torch.cuda.device_count()
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if idx >= n:
            raise ConfigError(f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", idx)
    if dev.type == "mps":
        if not _has_mps():
            raise ConfigError(f"--device {spec}: MPS (Apple GPU) is not available here; use --device cpu or auto")
        return dev
    raise ConfigError(f"unsupported device {spec!r}; use {DEVICE_HELP}")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device,
                  model_dtype: torch.dtype | None = None) -> torch.dtype:
    """The forward dtype for ``device``: explicit, or 'auto' (model's 16-bit dtype on accelerators, fp32 on CPU)."""
    if isinstance(spec, torch.dtype):
        return spec
    s = (spec or "auto").strip().lower()
    if s != "auto":
        if s not in _DTYPES:
            raise ConfigError(f"unknown dtype {spec!r}; use auto, bf16, fp16 or fp32")
        dt = _DTYPES[s]
        if dt == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{device} does not support bfloat16; use --dtype fp16 or fp32")
        return dt
    if device.type == "cpu":
        return torch.float32
    if model_dtype in (torch.float16, torch.bfloat16):
        if model_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return model_dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def device_policy(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                  model_dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev, model_dtype)


@contextlib.contextmanager
def exact_matmul():
    """TF32 off for statistics and solvers (restored afterwards); a no-op on the CPU."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def empty_cache(device: torch.device) -> None:
    """Give cached accelerator memory back once per block (the allocate/free churn of block onloading)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def configure_allocator() -> None:
    """Expandable segments reduce fragmentation from per-block allocate/free (only before CUDA starts)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def device_memory(device: torch.device) -> int | None:
    """Total bytes of ``device`` (None on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def peak_device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None
