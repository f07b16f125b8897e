import os

import pytest
import torch

os.environ.setdefault("WEIGHTLAB_PROGRESS", "0")


@pytest.fixture
def one_thread():
    """Tiny models: torch's intra-op threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module (for module-scoped fixtures that train)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sample_sd():
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.layers.0.mlp.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.bias": torch.randn(16, generator=g).half(),
        "model.layers.1.attn.weight": torch.randn(8, 8, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(8, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "codes": torch.randint(-128, 127, (5, 3), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (4,), dtype=torch.uint8, generator=g),
        "mask": torch.rand(6, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.25),
    }
    if hasattr(torch, "float8_e4m3fn"):
        sd["fp8"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
    return sd


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True
