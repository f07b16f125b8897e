"""Weight Aligning inside its class-incremental protocol: KD at T=2, lam = C_old / C_total, herding memory,
the FC-norm alignment and old/new accuracy bookkeeping. Hand cases and exact identities; tiny runs."""
import math

import pytest
import torch
from torch import nn

from weightlab.errors import ConfigError
from weightlab.merge import class_incremental as ci
from weightlab.merge.weight_align import weight_align

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_loss_hand_cases_use_the_temperature():
    zeros = torch.zeros(3, 4)
    assert float(ci.kd_loss(zeros, zeros, 2.0)) == pytest.approx(math.log(4))
    old, new = torch.tensor([[4.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)        # old / T
    logq = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)  # new / T
    assert float(ci.kd_loss(new, old, 2.0)) == pytest.approx(float(-(p * logq).sum()), abs=1e-6)
    assert float(ci.kd_loss(new, old, 1.0)) != pytest.approx(float(-(p * logq).sum()), abs=1e-3)


def test_herding_hand_case():
    f = torch.tensor([[0.0], [10.0], [4.0], [7.0]])  # mean 5.25: 4, then 7 (mean 5.5), then 0, then 10
    assert ci.herding(f, 4) == [2, 3, 0, 1]
    assert ci.herding(f, 2) == [2, 3] and ci.herding(f, 9) == [2, 3, 0, 1]


def test_task_splits():
    assert ci.task_splits(10, 5, None) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    s = ci.task_splits(10, 3, 1993)
    assert [len(t) for t in s] == [3, 4, 3] and sorted(c for t in s for c in t) == list(range(10))
    assert s == ci.task_splits(10, 3, 1993) and s != ci.task_splits(10, 3, 7)
    with pytest.raises(ConfigError):
        ci.task_splits(3, 4, None)


def test_weight_align_hand_case():
    w = torch.zeros(4, 3)
    w[0, 0], w[1, 1], w[2, 2], w[3, 0] = 2, 4, 1, 1
    out, gamma = weight_align(w, 2)
    assert gamma == pytest.approx(3.0)
    assert torch.equal(out[:2], w[:2]) and torch.allclose(out[2:], 3 * w[2:])
    assert float(out[2:].norm(dim=1).mean()) == pytest.approx(float(out[:2].norm(dim=1).mean()))
    w2 = torch.zeros(4, 3)
    w2[0, 0], w2[1, 1], w2[2, 2], w2[3, 0] = 2, 2, 1, 3
    assert weight_align(w2, 2)[1] == pytest.approx(1.0)


def test_accuracy_splits_old_and_new():
    net = ci.IncrementalNet(nn.Identity(), 3, bias=False)
    net.add_classes(3)
    with torch.no_grad():
        net.fc.weight.copy_(torch.eye(3))
    x = torch.eye(3)[[0, 1, 2, 2, 0]]  # predicts 0, 1, 2, 2, 0
    y = torch.tensor([0, 2, 2, 1, 1])  # old classes 0, 1 (3 samples, 1 right); new class 2 (2 samples, 1 right)
    acc = ci._accuracy(net, x, y, old=2)
    assert acc == {"all": pytest.approx(0.4), "old": pytest.approx(1 / 3), "new": pytest.approx(0.5),
                   "pred_new_fraction": pytest.approx(0.4)}


def test_growing_head_keeps_old_rows():
    net = ci.IncrementalNet(nn.Identity(), 4)
    net.add_classes(2)
    w, b = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    net.add_classes(3)
    assert net.fc.out_features == 5 and torch.equal(net.fc.weight[:2], w) and torch.equal(net.fc.bias[:2], b)


def _blobs(classes=6, per=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, 5, generator=g)
    y = torch.arange(classes).repeat_interleave(per)
    return centers[y] + torch.randn(len(y), 5, generator=g), y


def test_protocol_bookkeeping(monkeypatch):
    x, y = _blobs()
    xt, yt = _blobs(seed=1)
    seen_t, seen_shapes = set(), set()
    real = ci.kd_loss

    def spy(logits, old_logits, temperature):
        seen_t.add(temperature)
        seen_shapes.add((logits.shape[1], old_logits.shape[1]))
        return real(logits, old_logits, temperature)

    monkeypatch.setattr(ci, "kd_loss", spy)
    out = ci.run_class_incremental(x, y, xt, yt, tasks=3, memory=12, epochs=2, batch_size=16, class_order_seed=None)
    recs = out["tasks"]
    assert out["class_order"] == list(range(6)) and [r["classes"] for r in recs] == [[0, 1], [2, 3], [4, 5]]
    assert [r["old_classes"] for r in recs] == [0, 2, 4]
    assert [r["lam"] for r in recs] == pytest.approx([0, 0.5, 2 / 3])
    assert [r["memory_per_class"] for r in recs] == [6, 3, 2] and [r["memory_total"] for r in recs] == [12, 12, 12]
    assert [r["exemplars"] for r in recs] == [0, 12, 12]
    assert [r["train_samples"] for r in recs] == [60, 72, 72]
    assert seen_t == {2.0} and seen_shapes == {(2, 2), (4, 4)}
    assert recs[0]["gamma"] is None and all(r["gamma"] > 0 for r in recs[1:])
    for r in recs[1:]:
        assert r["norms"]["new"] == pytest.approx(r["norms"]["old"], rel=1e-5)
        g = r["norms_before_wa"]["old"] / r["norms_before_wa"]["new"]
        assert r["gamma"] == pytest.approx(g, rel=1e-5)
        a, n_old = r["acc"], int((yt < r["old_classes"]).sum())
        n_new = int(((yt >= r["old_classes"]) & (yt < r["old_classes"] + 2)).sum())
        assert a["all"] == pytest.approx((a["old"] * n_old + a["new"] * n_new) / (n_old + n_new))
    mem = out["memory"]
    assert sorted(mem) == list(range(6)) and all(len(v) == 2 for v in mem.values())
    assert all(bool((y[v] == c).all()) for c, v in mem.items())  # exemplars come from their own class


def test_protocol_without_align_or_kd():
    x, y = _blobs(classes=4)
    xt, yt = _blobs(classes=4, seed=1)
    out = ci.run_class_incremental(x, y, xt, yt, tasks=2, memory=8, epochs=1, align=False, kd=False)
    r = out["tasks"][1]
    assert r["gamma"] is None and r["acc"] == r["acc_before_wa"]
    clipped = ci.run_class_incremental(x, y, xt, yt, tasks=2, memory=8, epochs=1, clip_nonnegative=True,
                                       fc_bias=False)
    assert float(clipped["model"].fc.weight.detach().min()) >= 0 and clipped["model"].fc.bias is None


def test_protocol_remaps_a_shuffled_class_order():
    x, y = _blobs(classes=4)
    xt, yt = _blobs(classes=4, seed=1)
    out = ci.run_class_incremental(x, y, xt, yt, tasks=2, memory=8, epochs=1, class_order_seed=3)
    order = out["class_order"]
    assert sorted(order) == [0, 1, 2, 3] and out["tasks"][0]["classes"] == order[:2]
    assert all(bool((y[v] == c).all()) for c, v in out["memory"].items())


def test_bad_input():
    x, y = _blobs(classes=4)
    with pytest.raises(ConfigError):
        ci.run_class_incremental(x, y[:-1], x, y, tasks=2)
    with pytest.raises(ConfigError):
        ci.run_class_incremental(x, y, x, y, tasks=5)
