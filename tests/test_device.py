"""The device and precision policy: one clear error before any work, sensible 'auto' choices."""
import pytest
import torch

from weightlab.engine.device import device_policy, resolve_device, resolve_dtype
from weightlab.errors import ConfigError


def test_auto_is_cpu_without_accelerator():
    if torch.cuda.is_available():
        pytest.skip("an accelerator is present")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device(None) == resolve_device("auto")


def test_cpu_forward_dtype_is_fp32_and_explicit_dtypes_parse():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert device_policy("cpu", "fp32") == (cpu, torch.float32)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7"])
def test_missing_cuda_is_one_clear_error(spec):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device(spec)


def test_unknown_device_and_dtype():
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu9")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))
