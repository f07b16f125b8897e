"""SPDF (sparse pre-training, dense fine-tuning): masks held exactly through AdamW/SGD steps, released for
the dense phase, FLOPs counted by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from weightlab.compress.masks import MaskKeeper
from weightlab.compress.sparse_train import Recipe, forward_flops, train, training_flops
from weightlab.compress.spdf import SPDFConfig, equal_flops_epochs, random_masks, sparsified_layers, spdf
from weightlab.errors import ConfigError
from weightlab.registry import REGISTRY
from weightlab.zoo import MLP, SmallCNN


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _data(n=96, d=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, :k].argmax(1))


def test_random_masks_exact_count_per_layer_and_dense_head():
    torch.manual_seed(0)
    m = MLP(10, (20, 30), 4)
    names = sparsified_layers(m)
    assert names == ["body.0", "body.2"]  # head body.4 stays dense
    masks = random_masks(m, 0.75, names, seed=3)
    assert int(masks["body.0.weight"].sum()) == 50 and int(masks["body.2.weight"].sum()) == 150
    assert torch.equal(masks["body.0.weight"], random_masks(m, 0.75, names, seed=3)["body.0.weight"])
    assert not torch.equal(masks["body.0.weight"], random_masks(m, 0.75, names, seed=4)["body.0.weight"])
    with pytest.raises(ConfigError, match="body.9"):
        sparsified_layers(m, ["body.9"])


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_masked_weights_stay_exactly_zero_and_optimizer_state_untouched(opt):
    torch.manual_seed(0)
    m = MLP(8, (16,), 3)
    masks = random_masks(m, 0.5, ["body.0"], seed=0)
    x, y = _data()
    rec = Recipe(1, 0.05, opt, momentum=0.9, weight_decay=0.5, batch_size=16)
    o = rec.make_optimizer(m)
    MaskKeeper(m, masks).attach(o)
    w = m.body[0].weight
    dead = ~masks["body.0.weight"]
    for _ in range(6):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        assert int((w.detach()[dead] != 0).sum()) == 0
    st = o.state[w]
    buf = st["exp_avg"] if opt == "adamw" else st["momentum_buffer"]
    assert int((buf[dead] != 0).sum()) == 0  # no stale momentum waits to move them after the release
    assert int((w.detach()[~dead] != 0).sum()) == int((~dead).sum())


def test_release_keeps_the_function_then_lets_masked_weights_train():
    torch.manual_seed(0)
    m = MLP(8, (16,), 3)
    masks = random_masks(m, 0.6, ["body.0"], seed=1)
    x, y = _data()
    train(m, x, y, Recipe(3, 1e-2, "adamw", weight_decay=0.1, batch_size=32), masks=masks)
    dead = ~masks["body.0.weight"]
    assert int((m.body[0].weight.detach()[dead] != 0).sum()) == 0
    out_sparse = m(x).detach()
    # train() released the keeper: the same function, now dense-trainable
    assert torch.equal(m(x).detach(), out_sparse)
    train(m, x, y, Recipe(2, 1e-2, "adamw", weight_decay=0.1, batch_size=32))
    assert int((m.body[0].weight.detach()[dead] != 0).sum()) > 0.9 * int(dead.sum())


def test_flops_by_hand_mlp_and_cnn():
    m = MLP(10, (20, 30), 4)
    x = torch.randn(1, 10)
    assert forward_flops(m, x) == 2 * (10 * 20 + 20 * 30 + 30 * 4)
    masks = random_masks(m, 0.75, ["body.0", "body.2"], seed=0)
    assert forward_flops(m, x, masks) == 2 * (50 + 150 + 120)
    assert training_flops(m, x, 7, masks) == 3 * 2 * 320 * 7
    # SmallCNN on 8x8: conv1 1->16 3x3 at 8x8, pool to 4x4, conv2 16->32 3x3 at 4x4, head 128->10
    c = SmallCNN(10, (16, 32))
    assert forward_flops(c, torch.randn(1, 64)) == 2 * (16 * 9 * 64 + 32 * 16 * 9 * 16 + 128 * 10)
    # equal-FLOPs dense epochs: sparse epochs x (kept share of the weighted FLOPs)
    assert equal_flops_epochs(m, masks, x, 10) == pytest.approx(10 * 320 / 920)


def test_spdf_end_to_end_on_digits_is_registered_and_accounts():
    from weightlab.zoo import accuracy, load_dataset

    spec = REGISTRY.get("compress", "spdf")
    assert spec.fn is spdf and spec.defaults()["sparsity"] == 0.75
    data = load_dataset("digits")
    m = MLP(64, (64, 64), 10)
    torch.manual_seed(0)
    res = spdf(m, data, data, SPDFConfig(pretrain_epochs=3, finetune_epochs=2, seed=0))
    d = res.as_dict()
    assert d["masked_nonzero_at_switch"] == 0
    assert d["sparsity"] == pytest.approx(0.75, abs=1e-3)
    n = len(data.y_train)
    assert res.pretrain_steps == 3 * -(-n // 64) and res.finetune_steps == 2 * -(-n // 64)
    dense = 2 * (64 * 64 + 64 * 64 + 64 * 10)
    sparse = 2 * (round(0.25 * 64 * 64) * 2 + 64 * 10)
    assert res.dense_pretrain_flops == 3 * dense * 3 * n and res.pretrain_flops == 3 * sparse * 3 * n
    # after dense fine-tuning the formerly masked weights moved off zero
    w = m.body[0].weight.detach()
    assert int((w[~res.masks["body.0.weight"]] != 0).sum()) > 0
    assert accuracy(m, data.x_test, data.y_test) > 0.85


def test_spdf_bad_input_fails_before_training():
    m = MLP(8, (16,), 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="x, y"):
        spdf(m, 5)
    with pytest.raises(ConfigError):
        spdf(m, _data(), layers=["nope"])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_cli_spdf_writes_a_loadable_classifier(tmp_path):
    import json

    from weightlab.align.models import load_model
    from weightlab.cli import main

    out = tmp_path / "m"
    assert main(["spdf", "--dataset", "digits", "--hidden", "32,32", "--pretrain-epochs", "1", "--finetune-epochs",
                 "1", "--pretrain-classes", "0,1,2,3,4", "-o", str(out), "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["masked_nonzero_at_switch"] == 0 and s["sparsified_layers"] == ["body.0", "body.2"]
    assert s["dense_pretrain_flops"] / s["pretrain_flops"] == pytest.approx((64 * 32 + 32 * 32 + 320) / (
        round(0.25 * 64 * 32) + round(0.25 * 32 * 32) + 320))
    assert [m.out_features for m in load_model(str(out)).model.body if isinstance(m, nn.Linear)] == [32, 32, 10]
    assert main(["spdf", "--sparsity", "1.0", "-o", str(tmp_path / "bad")]) == 1  # before any work
    assert main(["spdf", "--dataset", "digits", "--pretrain-classes", "42", "-o", str(tmp_path / "bad")]) == 1
    assert not (tmp_path / "bad").exists()
