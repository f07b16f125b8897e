"""BigNAS: slices are views of the supernet, the sandwich step, in-place distillation, init, LR rule, BN
calibration, stand-alone children, search under a budget, and the CLI."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from weightlab.cli import main
from weightlab.elastic.bignas import (BigNASConfig, bignas_lr, calibrate, decay_every, evaluate, floor_epoch,
                                      sandwich_step, soft_ce, train_bignas)
from weightlab.elastic.bignas_io import load_split, save_child, save_supernet
from weightlab.elastic.bignas_nets import Child, ElasticCNN, ElasticMLP
from weightlab.elastic.bignas_search import all_children, mutate, search
from weightlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Run:
    def __init__(self, code, out, err):
        self.exit_code, self.stdout, self.output = code, out, out + err


def _cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    c = capsys.readouterr()
    return _Run(code, c.out, c.err)


def _cnn(dims=2, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return ElasticCNN(10, dims, 8 if dims == 2 else 12, widths=(4, 8), depths=(2, 2), kernels=(3, 5),
                      dropout=dropout)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return ElasticMLP(16, 5, hidden=(8, 8), dropout=0.0)


def _params(net):
    return dict(net.named_parameters())


# ---------------------------------------------------------------------------------------------- views
@pytest.mark.parametrize("make", [_cnn, lambda: _cnn(dims=1), _mlp])
def test_child_tensors_are_views_inside_the_parents_storage(make):
    net = make()
    rng = random.Random(0)
    owners = {}
    for name, p in net.named_parameters():
        owners[p.untyped_storage().data_ptr()] = p
    for child in [net.min_child(), net.max_child()] + [net.random_child(rng) for _ in range(5)]:
        for name, t in net.child_tensors(child).items():
            if name.endswith("num_batches_tracked"):
                continue
            base = t._base if t._base is not None else t
            parents = [p for p in list(net.parameters()) + list(net.buffers()) if p is base]
            assert parents, f"{name} is not a view of a supernet tensor"
            p = parents[0]
            start, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
            assert t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
            assert start <= t.data_ptr() < end


def test_step_on_the_smallest_child_changes_only_its_slice():
    net = _cnn()
    before = {k: v.detach().clone() for k, v in _params(net).items()}
    mn = net.min_child()
    net.train()
    net.set_child(mn)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    F.cross_entropy(net(x), y).backward()
    opt.step()
    # mark the min child's entries through its views, then compare outside them bit for bit
    masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in _params(net).items()}
    mask_net = _cnn()
    with torch.no_grad():
        for p in mask_net.parameters():
            p.zero_()
        for t in mask_net.child_tensors(mn, buffers=False).values():
            t.fill_(1.0)
    for k, p in mask_net.named_parameters():
        masks[k] = p.detach() == 1.0
    changed_inside = 0
    for k, p in _params(net).items():
        outside = ~masks[k]
        assert torch.equal(p.detach()[outside], before[k][outside]), k
        changed_inside += int((p.detach()[masks[k]] != before[k][masks[k]]).sum())
    assert changed_inside > 0


# -------------------------------------------------------------------------------------------- sandwich
def test_sandwich_step_runs_max_random_min_with_one_step_and_summed_gradients():
    cfg = BigNASConfig(dropout=0.0, label_smoothing=0.1, epochs=10)
    net = _cnn()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    # the separate per-child gradients, computed by hand from the same children
    rng = random.Random(5)
    children = [net.max_child()] + [net.random_child(rng) for _ in range(cfg.num_random)] + [net.min_child()]
    net.train()
    total = {k: torch.zeros_like(p) for k, p in _params(net).items()}
    net.set_child(children[0])
    teacher = None
    for i, c in enumerate(children):
        net.zero_grad(set_to_none=True)
        net.set_child(c)
        out = net(x)
        loss = F.cross_entropy(out, y, label_smoothing=0.1) if i == 0 else soft_ce(out, teacher)
        loss.backward()
        if i == 0:
            teacher = F.softmax(out.detach(), 1)
        for k, p in _params(net).items():
            if p.grad is not None:
                total[k] += p.grad
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    steps = []
    real_step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    res = sandwich_step(net, opt, x, y, cfg, random.Random(5))
    assert res["children"] == children and len(steps) == 1
    assert not res["teacher"].requires_grad
    for k, p in _params(net).items():
        torch.testing.assert_close(p.grad, total[k], atol=1e-6, rtol=1e-5)
    # with a real learning rate both the smallest child's slice and max-only entries move
    net2 = _cnn()
    head_before = net2.head.weight.detach().clone()
    sandwich_step(net2, torch.optim.SGD(net2.parameters(), lr=0.1), x, y, cfg, random.Random(1))
    c_min = net2.min_child().widths[-1] * 4
    assert (net2.head.weight.detach()[:, :c_min] != head_before[:, :c_min]).any()
    assert (net2.head.weight.detach()[:, c_min:] != head_before[:, c_min:]).any()


def test_distillation_target_is_detached_and_min_loss_grads_stay_in_its_slice():
    net = _cnn()
    net.train()
    x = torch.randn(16, 64)
    net.set_child(net.max_child())
    teacher = F.softmax(net(x).detach(), 1)
    net.zero_grad(set_to_none=True)
    mn = net.min_child()
    net.set_child(mn)
    soft_ce(net(x), teacher).backward()
    c = mn.widths[-1] * 4
    assert net.head.weight.grad[:, :c].abs().sum() > 0
    assert torch.count_nonzero(net.head.weight.grad[:, c:]) == 0
    w = mn.widths[0]
    g = net.stages[0].conv.weight.grad
    assert torch.count_nonzero(g[w:]) == 0 and torch.count_nonzero(g[:, :, 0]) == 0  # outside the 3x3 crop
    assert all(b.conv1.weight.grad is None for st in net.stages for b in st.blocks)  # depth 1: no blocks run


def test_dropout_only_while_the_largest_child_runs():
    net = _cnn(dropout=0.5)
    net.train()
    x = torch.randn(16, 64)
    mid = Child((4, 8), (2, 2), (3, 5))
    for child, stochastic in [(net.max_child(), True), (net.min_child(), False), (mid, False)]:
        net.set_child(child)
        a, b = net(x), net(x)
        assert (not torch.equal(a, b)) == stochastic, child


# ----------------------------------------------------------------------------------------- init and LR
def test_zero_init_makes_depth_children_identical_until_trained():
    net = _cnn()
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for st in net.stages for b in st.blocks)
    shallow = Child((4, 8), (1, 1), (5, 5))
    deep = Child((4, 8), (2, 2), (5, 5))
    x = torch.randn(16, 64)
    net.train()
    outs = []
    for c in (shallow, deep):
        net.set_child(c)
        outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    cfg = BigNASConfig(dropout=0.0, epochs=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for s in range(3):
        sandwich_step(net, opt, x, torch.randint(0, 10, (16,)), cfg, random.Random(s))
    net.set_child(shallow)
    a = net(x)
    net.set_child(deep)
    assert (a - net(x)).abs().max() > 1e-4


def test_lr_rule_warmup_exponential_decay_and_floor():
    cfg = BigNASConfig(lr=0.2, epochs=300, warmup_epochs=5, decay_epochs=2.4)
    assert bignas_lr(0.0, cfg) == 0.0
    assert bignas_lr(2.5, cfg) == pytest.approx(0.1)
    assert bignas_lr(5.0, cfg) == pytest.approx(0.2)
    assert bignas_lr(5 + 2.4, cfg) == pytest.approx(0.2 * 0.97)
    assert bignas_lr(5 + 24, cfg) == pytest.approx(0.2 * 0.97 ** 10)
    fe = floor_epoch(cfg)
    assert fe == pytest.approx(5 + 2.4 * math.log(0.05) / math.log(0.97))  # about 241 epochs
    assert bignas_lr(fe - 1, cfg) > 0.01 and bignas_lr(fe, cfg) == pytest.approx(0.01)
    vals = [bignas_lr(e / 10, cfg) for e in range(50, 3000)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and min(vals) == pytest.approx(0.01)
    short = BigNASConfig(epochs=40)  # default: decay rescaled so that the floor arrives at 70% of training
    assert floor_epoch(short) == pytest.approx(28.0) and decay_every(short) == pytest.approx(26 / 98.353, 1e-4)
    with pytest.raises(ValueError):
        BigNASConfig(epochs=2)  # the floor would come before the warmup ends


# ------------------------------------------------------------------------------------------- BN + export
@pytest.mark.parametrize("dims", [2, 1])
def test_calibration_equals_torch_cumulative_bn_and_export_matches(dims):
    net = _cnn(dims)
    x = torch.randn(200, 64 if dims == 2 else 12) * 2 + 0.5
    child = Child((2, 8), (2, 1), (3, 5))
    net.set_child(child)
    net.eval()
    with pytest.raises(ConfigError, match="not calibrated"):
        net(x[:4])
    calibrate(net, child, x, batches=64, batch_size=32, seed=3)
    # torch's own BatchNorm with momentum=None over the same batches, on an uncalibrated copy
    ref = net.static_child(child)
    for m in ref.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for b in range(200 // 32):
            ref(x[order[b * 32:(b + 1) * 32]])
    for k, v in ref.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(net.child_tensors(child)[k], v, atol=1e-5, rtol=1e-5)
    ref.eval()
    static = net.static_child(child)
    torch.testing.assert_close(static(x), net(x), atol=1e-5, rtol=1e-5)
    stats_child = net.child_tensors(child)["stages.1.bn.running_mean"].clone()
    other = net.max_child()
    calibrate(net, other, x, batches=64, batch_size=32)
    assert not torch.allclose(net.child_tensors(other)["stages.1.bn.running_mean"], stats_child)


def test_parameter_count_closed_form_and_mlp_child_is_a_zoo_mlp():
    net = _mlp()
    child = Child((4, 6), (2,))
    assert net.child_params(child) == 16 * 4 + 4 + 4 * 6 + 6 + 6 * 5 + 5
    assert net.child_params(Child((2, 8), (1,))) == 16 * 2 + 2 + 2 * 5 + 5  # the 2nd layer is not used
    cnn = _cnn()
    c = Child((2, 4), (1, 2), (3, 5))
    assert cnn.child_params(c) == (9 * 2 + 4) + (2 * 4 * 25 + 8) + 2 * (4 * 4 * 25 + 8) + 4 * 4 * 10 + 10
    from weightlab.zoo import MLP
    m = net.static_child(child)
    assert type(m) is MLP and [l.out_features for l in m.body if isinstance(l, torch.nn.Linear)] == [4, 6, 5]
    net.eval()
    net.set_child(child)
    x = torch.randn(8, 16)
    torch.testing.assert_close(m(x), net(x))


# ---------------------------------------------------------------------------------------------- search
def _oracle(c: Child) -> float:
    return sum(math.log(w) for w in c.widths[:c.depths[0]]) + 0.3 * c.depths[0] + 0.01 * c.widths[-1]


def test_search_respects_the_budget_and_finds_the_enumerated_optimum():
    net = _mlp()
    budget = 200
    fits = [c for c in all_children(net) if net.child_params(c) <= budget]
    best = max(fits, key=lambda c: (_oracle(c), -net.child_params(c)))
    res = search(net, _oracle, max_params=budget, exhaustive=True)
    assert res.child == best and res.params <= budget and len(res.history) == len(fits)
    r1 = search(net, _oracle, max_params=budget, fine_steps=60, seed=2)
    r2 = search(net, _oracle, max_params=budget, fine_steps=60, seed=2)
    assert r1.as_dict()["history"] == r2.as_dict()["history"]
    assert all(h["params"] <= budget for h in r1.history)
    assert r1.score == max(h["score"] for h in r1.history) == _oracle(r1.child)
    for _ in range(50):  # no single mutation that fits is better: a local optimum of the fine phase
        m = mutate(net, r1.child, random.Random(_))
        assert net.child_params(m) > budget or _oracle(m) <= r1.score
    lat = search(net, _oracle, max_latency_ms=1.0, latency=lambda c: net.child_params(c) / budget, exhaustive=True)
    assert lat.child == best
    with pytest.raises(ConfigError, match="no child fits"):
        search(net, _oracle, max_params=10)
    with pytest.raises(ConfigError, match="budget"):
        search(net, _oracle)


# ----------------------------------------------------------------------------------- training and CLI
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bignas")
    split = load_split("digits")
    out = {}
    for net in ("mlp", "cnn"):
        res = train_bignas(split, BigNASConfig(net=net, epochs=3, warmup_epochs=0.5, seed=1))
        out[net] = save_supernet(res.net, "digits", d / f"{net}-super", train_config=res.config.model_dump())
        out[net + "-result"] = res
    out["dir"] = d
    return out


def test_training_learns_and_children_work_without_retraining(trained):
    res = trained["cnn-result"]
    split = load_split("digits")
    net = res.net
    assert res.history[0]["lr"] > res.history[-1]["lr"] >= 0.05 * 0.05 - 1e-12
    for child in (net.max_child(), net.min_child()):
        calibrate(net, child, split.x_train)
        assert evaluate(net, split.x_test, split.y_test) > 0.5  # chance is 0.1


def test_cli_slice_eval_info_and_search(trained, tmp_path, capsys):
    sup = str(trained["mlp"])
    child = str(tmp_path / "child")
    r = _cli(capsys, "elastic", "slice", sup, "--width", "0.5", "--depth", "2", "-o", child)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["model_type"] == "weightlab-zoo-classifier" and cfg["hidden"] == [64, 64]
    r = _cli(capsys, "info", child, "--json")
    own = 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert json.loads(r.stdout)["num_parameters"] == own
    from weightlab.align.models import load_model  # another family reads the child
    assert load_model(child).model.body[0].weight.shape == (64, 64)
    r = _cli(capsys, "elastic", "eval", child, "--dataset", "digits", "--json")
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and 0.0 <= d["accuracy"] <= 1.0 and d["parameters"] == own
    r = _cli(capsys, "elastic", "eval", sup, "--dataset", "digits", "--json")
    d = json.loads(r.stdout)
    assert d["child"]["widths"] == [128, 128, 128] and d["accuracy"] > 0.5
    r = _cli(capsys, "elastic", "search", sup, "--max-params", "5000", "--fine-steps", "3", "--json")
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and d["parameters"] <= 5000
    assert d["accuracy"] == max(h["score"] for h in d["history"])
    cnn_child = tmp_path / "cnn-child"
    r = _cli(capsys, "elastic", "slice", trained["cnn"], "--width", "0.25", "--depth", "1", "--kernel", "3",
             "-o", cnn_child)
    assert r.exit_code == 0, r.output
    r = _cli(capsys, "elastic", "eval", str(cnn_child), "--dataset", "digits", "--json")
    assert json.loads(r.stdout)["parameters"] == 627


def test_cli_errors(trained, tmp_path, capsys):
    sup = str(trained["mlp"])
    r = _cli(capsys, "elastic", "slice", sup, "--width", "0.3", "-o", str(tmp_path / "c"))
    assert r.exit_code == 1 and "0.3" in r.output and not (tmp_path / "c").exists()
    r = _cli(capsys, "elastic", "slice", sup, "--width", "0.5", "--kernel", "3", "-o", str(tmp_path / "c"))
    assert r.exit_code == 1 and "kernel" in r.output
    r = _cli(capsys, "elastic", "slice", sup, "--width", "0.5", "-o", sup)
    assert r.exit_code == 1
    r = _cli(capsys, "elastic", "search", sup, "--max-params", "10")
    assert r.exit_code == 1 and "no child fits" in r.output
    r = _cli(capsys, "elastic", "eval", sup, "--dataset", "mnist1d")
    assert r.exit_code == 1 and "digits" in r.output
    r = _cli(capsys, "elastic", "eval", str(tmp_path / "nope"), "--dataset", "digits")
    assert r.exit_code == 1 and "does not exist" in r.output
    r = _cli(capsys, "elastic", "train", "bignas", "--dataset", "wine", "-o", str(tmp_path / "s"))
    assert r.exit_code == 1 and "digits, mnist1d or text" in r.output
    r = _cli(capsys, "elastic", "train", "bignas", "--dataset", "digits", "-o", sup)
    assert r.exit_code == 1 and "already exists" in r.output
    r = _cli(capsys, "elastic", "train", "bignas", "--dataset", "digits")
    assert r.exit_code == 2  # -o is required


@pytest.mark.slow
def test_cli_train_bignas_writes_a_supernet(tmp_path, capsys):
    out = tmp_path / "sup"
    r = _cli(capsys, "elastic", "train", "bignas", "--dataset", "digits", "--seed", "3", "--net", "mlp",
                            "--epochs", "3", "-o", str(out))
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "weightlab-bignas-supernet" and cfg["train"]["seed"] == 3
