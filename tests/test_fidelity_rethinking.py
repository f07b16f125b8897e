""""Rethinking the value of network pruning": structured pruning builds a smaller network, scratch training
starts from a fresh init, Scratch-E/B epoch bookkeeping, unstructured masks held through scratch training."""
from __future__ import annotations

import copy

import pytest
import torch

import weightlab as wl
from weightlab.compress.rethinking import (RethinkingConfig, finetune, fresh_like, magnitude_masks, prune_channels,
                                           prune_for, scratch_epochs, train_from_scratch)
from weightlab.compress.sparse_train import forward_flops
from weightlab.errors import ConfigError
from weightlab.registry import REGISTRY
from weightlab.zoo import MLP, SmallCNN, load_dataset


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _mlp_params(i, hidden, o):
    dims = [i, *hidden, o]
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


def test_mlp_channel_pruning_is_a_smaller_network_keeping_largest_l1_units():
    torch.manual_seed(0)
    m = MLP(12, (10, 8), 5)
    with torch.no_grad():  # plant: units 3 and 7 of layer 1 have the largest rows; 1 of layer 2
        m.body[0].weight[[3, 7]] *= 50
        m.body[2].weight[1] *= 50
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = prune_channels(m, 0.75)
    assert isinstance(s, MLP) and [l.out_features for l in s.body if isinstance(l, torch.nn.Linear)] == [2, 2, 5]
    assert sum(p.numel() for p in s.parameters()) == _mlp_params(12, (2, 2), 5)
    assert torch.equal(s.body[0].weight, m.body[0].weight[[3, 7]])
    l2 = torch.topk(m.body[2].weight.abs().sum(1), 2).indices.sort().values
    assert torch.equal(s.body[2].weight, m.body[2].weight[l2][:, [3, 7]])
    assert torch.equal(s.body[4].weight, m.body[4].weight[:, l2])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # input untouched
    # the pruned network computes the large one with the dropped units silenced
    x = torch.randn(5, 12)
    big = copy.deepcopy(m)
    with torch.no_grad():
        keep0 = torch.zeros(10, dtype=torch.bool)
        keep0[[3, 7]] = True
        big.body[0].weight[~keep0] = 0
        big.body[0].bias[~keep0] = 0
        keep1 = torch.zeros(8, dtype=torch.bool)
        keep1[l2] = True
        big.body[2].weight[~keep1] = 0
        big.body[2].bias[~keep1] = 0
    assert torch.allclose(s(x), big(x), atol=1e-5)


def test_cnn_channel_pruning_matches_the_masked_large_network():
    torch.manual_seed(0)
    c = SmallCNN(10, (16, 32)).eval()
    with torch.no_grad():
        for bn in (c.features[1], c.features[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    s = prune_channels(c, 0.5)
    assert s.features[0].out_channels == 8 and s.features[4].out_channels == 16 and s.head.in_features == 64
    assert sum(p.numel() for p in s.parameters()) == (8 * 9 + 2 * 8) + (16 * 8 * 9 + 2 * 16) + (64 * 10 + 10)
    k1 = torch.topk(c.features[0].weight.abs().sum((1, 2, 3)), 8).indices
    k2 = torch.topk(c.features[4].weight.abs().sum((1, 2, 3)), 16).indices
    big = copy.deepcopy(c)
    with torch.no_grad():  # silence dropped channels: BN beta and mean so their ReLU output is exactly 0
        for conv, bn, k in ((big.features[0], big.features[1], k1), (big.features[4], big.features[5], k2)):
            drop = torch.ones(conv.out_channels, dtype=torch.bool)
            drop[k] = False
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    x = torch.randn(4, 64)
    assert torch.allclose(s(x), big(x), atol=1e-5)


def test_scratch_starts_from_a_fresh_init_not_the_pruned_weights():
    torch.manual_seed(0)
    s = prune_channels(MLP(12, (10, 8), 5), 0.5)
    f1, f2 = fresh_like(s, 1), fresh_like(s, 1)
    for (n, p), q, r in zip(s.named_parameters(), f1.parameters(), f2.parameters()):
        assert p.shape == q.shape and not torch.equal(p, q), n
        assert torch.equal(q, r)  # seeded
    assert not torch.equal(fresh_like(s, 2).body[0].weight, f1.body[0].weight)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 3))

    with pytest.raises(ConfigError, match="reset_parameters"):
        fresh_like(Odd(), 0)


def test_scratch_e_and_b_epoch_bookkeeping():
    data = load_dataset("digits")
    torch.manual_seed(0)
    large = MLP(64, (64, 64), 10)
    small = prune_channels(large, 0.5)
    x = data.x_train[:1]
    f_large, f_small = forward_flops(large, x), forward_flops(small, x)
    assert f_large == 2 * (64 * 64 + 64 * 64 + 640) and f_small == 2 * (64 * 32 + 32 * 32 + 320)
    assert scratch_epochs(RethinkingConfig(epochs=10), large, small, x) == 10
    assert scratch_epochs(RethinkingConfig(epochs=10, budget="B"), large, small, x) == int(10 * f_large / f_small)
    assert scratch_epochs(RethinkingConfig(epochs=10, budget="B", max_epoch_factor=2), large, small, x) == 20
    masks = magnitude_masks(large, 0.8)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == pytest.approx(0.2 * (64 * 64 * 2 + 640), abs=2)
    assert scratch_epochs(RethinkingConfig(epochs=3, budget="B"), large, large, x, masks) == int(
        3 * f_large / (2 * kept))


def test_train_from_scratch_registered_runs_epochs_and_holds_masks():
    spec = REGISTRY.get("compress", "scratch")
    assert spec.fn is train_from_scratch and spec.defaults()["budget"] == "E"
    data = load_dataset("digits")
    torch.manual_seed(0)
    large = MLP(64, (32, 32), 10)
    cfg = RethinkingConfig(structure="weights", ratio=0.7, epochs=2, seed=5)
    pruned, masks = prune_for(large, cfg)
    res = train_from_scratch(pruned, data, cfg, masks=masks)
    n = len(data.y_train)
    assert res.epochs == 2 and res.steps == 2 * -(-n // 64)
    for name, p in res.model.named_parameters():
        if name in masks:
            assert int((p.detach()[~masks[name]] != 0).sum()) == 0
            assert not torch.equal(p.detach()[masks[name]], pruned.state_dict()[name][masks[name]])
    ft = finetune(pruned, data, cfg, epochs=1, masks=masks)
    assert ft.epochs == 1 and ft.steps == -(-n // 64)
    assert int((ft.model.body[0].weight.detach()[~masks["body.0.weight"]] != 0).sum()) == 0
    with pytest.raises(ConfigError, match="large="):
        train_from_scratch(pruned, data, cfg.model_copy(update={"budget": "B"}))
    with pytest.raises(ConfigError, match="zoo MLP and SmallCNN"):
        prune_channels(torch.nn.Sequential(torch.nn.Linear(3, 3)), 0.5)


def test_reinitialize_pruned_still_reapplies_masks():
    m = MLP(6, (5,), 2)
    masks = {"body.0.weight": torch.rand(5, 6) > 0.5}
    wl.compress.reinitialize_pruned(m, masks, seed=0)
    assert int((m.body[0].weight.detach()[~masks["body.0.weight"]] != 0).sum()) == 0


def test_cli_scratch_channels_writes_the_smaller_network(tmp_path):
    import json

    from weightlab.align.models import load_model
    from weightlab.cli import main

    big = tmp_path / "big"
    assert main(["spdf", "--dataset", "digits", "--hidden", "32,32", "--sparsity", "0.5", "--pretrain-epochs", "2",
                 "--finetune-epochs", "0", "-o", str(big)]) == 0
    out = tmp_path / "small"
    assert main(["scratch", str(big), "--ratio", "0.75", "--epochs", "1", "--budget", "B", "--compare", "-o",
                 str(out), "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    f_big, f_small = 64 * 32 + 32 * 32 + 320, 64 * 8 + 8 * 8 + 80
    assert s["scratch"]["epochs"] == int(1 * f_big / f_small) and s["scratch"]["params"] == _mlp_params(64, (8, 8), 10)
    assert s["finetune_e"]["epochs"] == 1 and 0 <= s["finetune_e4"]["acc"] <= 1
    m = load_model(str(out)).model
    assert [l.out_features for l in m.body if isinstance(l, torch.nn.Linear)] == [8, 8, 10]
    assert main(["scratch", str(big), "--structure", "rows", "-o", str(tmp_path / "bad")]) == 1
    assert not (tmp_path / "bad").exists()
