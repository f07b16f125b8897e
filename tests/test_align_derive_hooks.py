"""spec="auto" without torch.fx: the run order of leaf modules on one example input."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from weightlab.align import permuted_copy, pleas, spec_from_module, weight_matching
from weightlab.align.derive_hooks import spec_from_hooks
from weightlab.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


class Branchy(nn.Module):
    """An MLP whose forward branches on the data: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 24)
        self.norm = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 16)
        self.drop = nn.Dropout(0.1)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.norm(F.relu(self.fc1(x)))
        if bool((x > 0).float().mean() > 0.5):
            h = F.gelu(self.fc2(h))
        else:
            h = torch.tanh(self.fc2(h))
        return self.fc3(self.drop(h))


class BranchyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = x.reshape(-1, 1, 8, 8)
        if x.abs().max() > 1e6:  # data-dependent guard
            x = x / x.abs().max()
        h = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.flatten(self.pool(h), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        if bool(h.sum() > -1e9):
            h = h + F.relu(self.fc2(h))  # residual add: invisible to hooks
        return self.fc3(h)


def _bn_random(m):
    g = torch.Generator().manual_seed(3)
    m.bn1.running_mean.copy_(torch.randn(6, generator=g))
    m.bn1.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    return m.eval()


def test_fx_fails_but_auto_spec_recovers_a_planted_permutation():
    torch.manual_seed(0)
    a = Branchy().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(a)
    s = spec_from_module(a)
    assert s.sizes == {"fc1": 24, "fc2": 16}
    assert sorted(s.groups["fc1"]) == sorted([("fc1.weight", 0), ("fc1.bias", 0), ("norm.weight", 0),
                                              ("norm.bias", 0), ("fc2.weight", 1)])
    assert sorted(s.groups["fc2"]) == sorted([("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)])
    planted = s.random(5)
    b = permuted_copy(a, s, planted)
    x = torch.randn(64, 10)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    aligned, perms = weight_matching(a, b)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[k], v, rtol=0, atol=0)
    for p, perm in planted.items():  # perm[i] = j: unit i of B was unit perm[i] of A
        assert torch.equal(perm[perms[p]], torch.arange(len(perm)))


def test_cnn_with_batchnorm_and_flatten_into_linear():
    torch.manual_seed(1)
    a = _bn_random(BranchyCNN())
    x = torch.randn(32, 64)
    s = spec_from_module(a, example=x)
    assert s.sizes == {"conv1": 6, "conv2": 8}
    assert ("bn1.running_var", 0) in s.groups["conv1"] and ("head.weight", 1) in s.groups["conv2"]
    b = permuted_copy(a, s, s.random(2))
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    aligned, _ = weight_matching(a, b, example=x)
    torch.testing.assert_close(aligned.state_dict(), a.state_dict(), rtol=0, atol=0)


def test_pleas_runs_on_an_untraceable_chain():
    torch.manual_seed(0)
    a = Branchy().eval()
    s = spec_from_module(a)
    b = permuted_copy(a, s, s.random(1))
    x = torch.randn(400, 10)
    res = pleas(a, b, x, ratio=0.0, ridge=1e-10)
    assert res.widths == {"fc1": 24, "fc2": 16} and max(res.layer_error.values()) < 1e-9
    torch.testing.assert_close(res.model(x[:20]), a(x[:20]), rtol=1e-4, atol=1e-4)


def test_residual_adds_are_caught_and_the_error_says_what_to_do():
    torch.manual_seed(0)
    m = Residual().eval()
    with pytest.raises(ConfigError, match="hand spec") as e:
        spec_from_module(m)
    assert "torch.fx cannot trace" in str(e.value) and "not its data flow" in str(e.value)


def test_module_that_did_not_run_or_runs_twice_is_refused():
    class Skips(Branchy):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)

    with pytest.raises(ConfigError, match="'unused'.*did not run"):
        spec_from_hooks(Skips().eval())

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(ConfigError, match="more than once"):
        spec_from_hooks(Twice())


def test_bad_example_input_is_a_config_error():
    with pytest.raises(ConfigError, match="example"):
        spec_from_hooks(Branchy(), torch.randn(4, 3))
