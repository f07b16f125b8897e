import pytest
import torch
from torch import nn

import weightlab as wl
from weightlab.align import PermutationSpec, apply_permutation, permuted_copy, spec_from_module, weight_matching
from weightlab.zoo import MLP, SmallCNN


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class ResCNN(nn.Module):
    """Conv stem, two residual blocks sharing one stream, a channel-changing conv, a head."""

    def __init__(self, c=8, d=12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b2 = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, c, 1))
        self.down = nn.Conv2d(c, d, 3, stride=2, padding=1)
        self.head = nn.Linear(d * 4, 10)

    def forward(self, x):
        x = self.stem(x.reshape(-1, 1, 8, 8))
        x = torch.relu(x + self.b1(x))
        x = x + self.b2(x)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.down(x)), 2)
        return self.head(torch.flatten(x, 1))


def test_mlp_spec_is_derived_and_output_layer_is_frozen():
    s = spec_from_module(MLP(10, (7, 5), 3))
    assert s.sizes == {"body.0": 7, "body.2": 5}
    assert s.groups["body.0"] == [("body.0.weight", 0), ("body.0.bias", 0), ("body.2.weight", 1)]
    assert ("body.4.weight", 1) in s.groups["body.2"]
    assert not any(t == "body.4.weight" and a == 0 for e in s.groups.values() for t, a in e)


def test_residual_blocks_share_one_permutation():
    s = spec_from_module(ResCNN())
    # stem output, both block outputs and the residual adds are one stream
    stream = s.groups["stem.0"]
    for t in ("b1.4.weight", "b1.3.weight", "b2.2.weight", "b2.2.bias", "down.weight", "stem.1.running_var"):
        assert any(e[0] == t for e in stream), t
    assert s.sizes["b1.0"] == 8 and s.sizes["b2.0"] == 6 and s.sizes["down"] == 12
    assert ("head.weight", 1) in s.groups["down"]  # flattened 12 channels x 4 positions


@pytest.mark.parametrize("make", [lambda: MLP(20, (16, 12, 8), 5), lambda: _randomize_bn(SmallCNN()),
                                  lambda: _randomize_bn(ResCNN())])
def test_permuted_model_computes_the_same_function(make):
    torch.manual_seed(0)
    a = make()
    s = spec_from_module(a)
    b = permuted_copy(a, s, s.random(1))
    assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    x = torch.randn(16, 64 if not isinstance(a, MLP) else 20)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: MLP(20, (32, 24, 16), 5), lambda: _randomize_bn(SmallCNN()),
                                  lambda: _randomize_bn(ResCNN())])
def test_planted_permutation_is_recovered_exactly(make):
    torch.manual_seed(1)
    a = make()
    s = spec_from_module(a)
    planted = s.random(7)
    b = permuted_copy(a, s, planted)
    back, perms = weight_matching(a, b)
    for k, v in a.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the found permutation undoes the planted one: perms[p] = planted[p]^-1
    for p in s.sizes:
        assert torch.equal(planted[p][perms[p]], torch.arange(s.sizes[p])), p


def test_matching_never_lowers_the_objective_and_identity_on_itself():
    torch.manual_seed(0)
    a, b = MLP(20, (32, 32), 5), MLP(20, (32, 32), 5)
    res = wl.align.match(a, b)
    assert res.objective >= res.objective_start
    assert all(x <= y + 1e-9 for x, y in zip(res.history, res.history[1:]))
    same = wl.align.match(a, a)
    assert all(torch.equal(v, torch.arange(v.numel())) for v in same.perms.values())


def test_spec_roundtrip_and_errors(tmp_path):
    s = spec_from_module(MLP(10, (7,), 3))
    f = tmp_path / "spec.json"
    import json

    f.write_text(json.dumps(s.to_dict()))
    assert PermutationSpec.load(f).groups == s.groups
    bad = PermutationSpec({"p": [("nope.weight", 0)]}, {"p": 3})
    with pytest.raises(wl.ConfigError, match="nope.weight"):
        bad.validate(MLP(10, (7,), 3).state_dict())
    with pytest.raises(wl.ConfigError, match="multiple"):
        PermutationSpec({"p": [("body.0.weight", 0)]}, {"p": 5}).validate(MLP(10, (7,), 3).state_dict())
    with pytest.raises(wl.ConfigError, match="architecture"):
        weight_matching(MLP(10, (7,), 3), MLP(10, (8,), 3))


def test_untraceable_model_falls_back_to_the_run_order_or_asks_for_a_hand_spec():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return self.l(x) if x.sum() > 0 else x

    s = spec_from_module(Branchy(), example=torch.ones(2, 3))
    assert s.groups == {} and any("example input" in n for n in s.notes)  # its only layer is the output
    with pytest.raises(wl.ConfigError, match="by hand|hand spec"):  # the branch that skips the layer
        spec_from_module(Branchy(), example=-torch.ones(2, 3))


def test_apply_permutation_blocks():
    # one perm of 2 units over an axis of 6 = 2 blocks of 3
    t = torch.arange(12.0).reshape(2, 6)
    s = PermutationSpec({"p": [("t", 1)]}, {"p": 2})
    out = apply_permutation(s, {"p": torch.tensor([1, 0])}, {"t": t})["t"]
    assert out.tolist() == [[3, 4, 5, 0, 1, 2], [9, 10, 11, 6, 7, 8]]
