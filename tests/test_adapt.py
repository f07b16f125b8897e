"""Adapter framework and methods: the shared proof kit (init, merge, grad, count) plus per-method identities."""
import copy

import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.adapt.bat import bat_delta
from weightlab.errors import ConfigError

transformers = pytest.importorskip("transformers")

# (method, config) with non-trivial init for methods that start at zero (bone/bat random for T-merge)
METHODS = [("lora", dict(r=4, alpha=8)), ("lora", dict(r=4, alpha=8, rslora=True)), ("pissa", dict(r=4, alpha=4)),
           ("pissa", dict(r=4, alpha=8, niter=4)), ("sorsa", dict(r=4)), ("bone", dict(r=4)), ("bat", dict(r=4)),
           ("gradnormlorp", dict(r=4)), ("dora", dict(r=4, alpha=8)), ("ia3", dict()),
           ("vera", dict(r=4)), ("loha", dict(r=4, alpha=8)), ("lokr", dict(r=4, alpha=8))]
COUNTS = {"lora": lambda r, o, i: r * (o + i), "pissa": lambda r, o, i: r * (o + i),
          "sorsa": lambda r, o, i: r * (o + i) + r, "bone": lambda r, o, i: r * o, "bat": lambda r, o, i: o * r,
          "gradnormlorp": lambda r, o, i: r * (o + i) + o, "dora": lambda r, o, i: r * (o + i) + o,
          "ia3": lambda r, o, i: o, "vera": lambda r, o, i: o + r, "loha": lambda r, o, i: 2 * r * (o + i),
          "lokr": lambda r, o, i: _lokr_count(r, o, i)}


def _lokr_count(r, o, i):
    from weightlab.adapt.lokr import factorization

    (a, b), (c, d) = factorization(o), factorization(i)
    return a * c + (b * d if r >= max(b, d) / 2 else r * (b + d))  # the count test's targets (q_proj, v_proj) scale their outputs


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(seed=1):
    return torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(seed))


def perturb(model):
    """Move every trainable tensor so merge tests see a non-zero update."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method,cfg", METHODS)
def test_init_unchanged(method, cfg):
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, method, targets=["q_proj", "v_proj", "down_proj"], **cfg)
    y1 = m(x).logits
    assert torch.allclose(y0, y1, atol=1e-5)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_merge_equals_adapter_and_unmerge_restores(method, cfg):
    m = tiny_llama()
    x = ids()
    adapt.attach(m, method, targets="all-linear", **cfg)
    perturb(m)
    W_before = {n: l.weight_2d().detach().clone() for n, l in adapt.adapter_layers(m).items()}
    y_ad = m(x).logits
    adapt.fold(m, unload=False)
    assert torch.allclose(m(x).logits, y_ad, atol=1e-4)
    adapt.unfold(m)
    for n, l in adapt.adapter_layers(m).items():
        W = l.weight_2d()
        assert (W - W_before[n]).norm() <= 1e-5 * W_before[n].norm(), n
    assert torch.allclose(m(x).logits, y_ad, atol=1e-4)
    # per layer: merged Linear == adapter forward
    for n, l in adapt.adapter_layers(m).items():
        xi = torch.randn(8, l.in_features)
        ref = l(xi)
        lin = nn.Linear(l.in_features, l.out_features, bias=False)
        lin.weight.data = l.merged_weight()
        assert (lin(xi) - ref).abs().max() <= 1e-5 * max(1.0, float(l.weight_2d().norm())), n
    adapt.fold(m)  # unload: plain layers again
    assert not adapt.adapter_layers(m)
    assert torch.allclose(m(x).logits, y_ad, atol=1e-4)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_only_adapter_tensors_get_gradients_and_counts(method, cfg):
    m = tiny_llama()
    adapt.attach(m, method, targets=["q_proj", "v_proj"], **cfg)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    opt = adapt.make_optimizer(m, 1e-2)
    x = ids()
    m(x, labels=x).loss.backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    r = cfg.get("r")
    expect = sum(COUNTS[method](r, l.out_features, l.in_features) for l in adapt.adapter_layers(m).values())
    assert adapt.count_trainable(m) == expect


@pytest.mark.parametrize("method,cfg", METHODS)
def test_detach_restores_and_save_load(method, cfg, tmp_path):
    m = tiny_llama()
    sd0 = copy.deepcopy(m.state_dict())
    x = ids()
    adapt.attach(m, method, targets=["q_proj", "o_proj"], **cfg)
    perturb(m)
    y = m(x).logits
    adapt.save(m, tmp_path / "ad")
    adapt.detach(m)
    for k, v in m.state_dict().items():
        assert torch.allclose(v, sd0[k], atol=1e-6), k
    fresh = tiny_llama()
    adapt.load(fresh, tmp_path / "ad")
    assert torch.allclose(fresh(x).logits, y, atol=1e-5)
    with pytest.raises(Exception):
        adapt.save(fresh, tmp_path / "ad")  # exists, no force


def test_targets_selection():
    m = tiny_llama()
    assert len(adapt.select_targets(m, ["q_proj"])) == 2
    assert len(adapt.select_targets(m, r"model\.layers\.0\..*proj")) == 7
    names = adapt.select_targets(m, "all-linear")
    assert "lm_head" not in names and len(names) == 14
    with pytest.raises(ConfigError):
        adapt.select_targets(m, ["nope"])
    with pytest.raises(ConfigError):
        adapt.attach(m, "lora", targets=["q_proj"], bogus=1)
    with pytest.raises(ConfigError):
        adapt.attach(tiny_llama(), "lorra", targets=["q_proj"])


def test_conv1d_and_conv2d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(12, 10))
    x = torch.randn(4, 10)
    y0 = net(x)
    adapt.attach(net, "lora", targets=["0"], r=3)
    assert torch.allclose(net(x), y0)
    perturb(net)
    y = net(x)
    adapt.fold(net)
    assert isinstance(net[0], Conv1D) and torch.allclose(net(x), y, atol=1e-5)
    conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
    xi = torch.randn(2, 3, 8, 8)
    y0 = conv(xi)
    adapt.attach(conv, "lora", targets=["0"], r=2)
    assert torch.allclose(conv(xi), y0)
    perturb(conv)
    y = conv(xi)
    adapt.fold(conv)
    assert torch.allclose(conv(xi), y, atol=1e-5)
    with pytest.raises(ConfigError):
        adapt.attach(nn.Sequential(nn.Conv2d(3, 6, 3)), "sorsa", targets=["0"], r=2)


def _decaying(out=64, inp=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    V, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    k = min(out, inp)
    return U[:, :k] @ torch.diag(1.0 / torch.arange(1, k + 1)) @ V[:, :k].t()


def test_pissa_svd_identities():
    W0 = _decaying()
    lin = nn.Sequential(nn.Linear(48, 64, bias=False))
    lin[0].weight.data = W0.clone()
    r = 4
    adapt.attach(lin, "pissa", targets=["0"], r=r, alpha=8)
    l = lin[0]
    s = 8 / r
    Wres = l.weight_2d()
    BA = l.adapter.lora_B @ l.adapter.lora_A
    assert torch.allclose(Wres + s * BA, W0, atol=1e-6)
    S = torch.linalg.svdvals(W0)
    assert torch.allclose(torch.linalg.svdvals(Wres)[: 48 - r], S[r:], atol=1e-5)
    assert torch.isclose((W0 - s * BA).norm() ** 2, (S[r:] ** 2).sum(), rtol=1e-4)
    # randomized SVD init matches exact on a decaying spectrum
    lin2 = nn.Sequential(nn.Linear(48, 64, bias=False))
    lin2[0].weight.data = W0.clone()
    adapt.attach(lin2, "pissa", targets=["0"], r=r, alpha=8, niter=16)
    assert torch.allclose(lin2[0].weight_2d(), Wres, atol=1e-4)


def test_sorsa_identities_and_regularizer():
    W0 = _decaying()
    lin = nn.Sequential(nn.Linear(48, 64, bias=False))
    lin[0].weight.data = W0.clone()
    adapt.attach(lin, "sorsa", targets=["0"], r=4)
    a = lin[0].adapter
    assert torch.allclose(lin[0].weight_2d() + (a.B * a.S) @ a.A, W0, atol=1e-6)
    assert adapt.regularizer_values(lin)["sorsa"] < 1e-5
    cfg = lin[0].method.cfg
    assert cfg.gamma == 4e-4 and cfg.lr_base == 3e-5 and cfg.alpha is None


def test_sorsa_regularizer_not_clipped():
    lin = nn.Sequential(nn.Linear(16, 16, bias=False))
    adapt.attach(lin, "sorsa", targets=["0"], r=4)
    with torch.no_grad():
        lin[0].adapter.A.mul_(1.5)  # off the Stiefel manifold: a large regularizer gradient
    # the regularizer's gradient alone
    adapt.regularizers(lin).backward()
    g_reg = lin[0].adapter.A.grad.clone()
    lin.zero_grad()
    x = torch.randn(4, 16)
    lin(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(adapt.trainable_parameters(lin), max_norm=1e-6)
    g_task = lin[0].adapter.A.grad.clone()
    assert g_task.norm() <= 1.01e-6
    adapt.backward_regularizers(lin)
    assert torch.allclose(lin[0].adapter.A.grad - g_task, g_reg, atol=1e-6)
    assert g_reg.norm() > 1.0


def test_sorsa_gamma_keeps_orthonormal():
    W0 = _decaying()
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(64, 4, generator=g) @ torch.randn(4, 48, generator=g) * 0.1
    X = torch.randn(256, 48, generator=g)
    errs = {}
    for gamma in (0.0, 4e-4):
        lin = nn.Sequential(nn.Linear(48, 64, bias=False))
        lin[0].weight.data = W0.clone()
        adapt.attach(lin, "sorsa", targets=["0"], r=4, gamma=gamma, lr_base=3e-5)
        opt = adapt.make_optimizer(lin, 1e-2)
        for _ in range(100):
            opt.zero_grad()
            ((lin(X) - X @ (W0 + dW).t()) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(adapt.trainable_parameters(lin), 1.0)
            adapt.backward_regularizers(lin)
            opt.step()
        errs[gamma] = adapt.regularizer_values(lin)["sorsa"]
    assert errs[4e-4] < errs[0.0]


def test_bone_fast_path_equals_materialized():
    lin = nn.Sequential(nn.Linear(10, 12))  # 10 % 4 != 0: padded
    adapt.attach(lin, "bone", targets=["0"], r=4, init="random")
    l = lin[0]
    x = torch.randn(5, 10)
    dW = l.method.delta(l, l.weight_2d().float())
    assert torch.allclose(l.method.delta_forward(l, x), x @ dW.t(), atol=1e-6)
    M = l.adapter.M
    for o in range(12):
        for j in range(10):
            assert dW[o, j] == M[j % 4, o]


def test_bat_gradient_formula_and_inverse():
    torch.manual_seed(0)
    r = 4
    W = torch.randn(8, 12)
    T = (0.05 * torch.randn(2, r, r)).requires_grad_(True)
    Wp = W + bat_delta(W, T)
    G = torch.randn(8, 12)
    (Wp * G).sum().backward()
    Wb = W.reshape(2, r, 3, r).permute(0, 2, 1, 3)
    Gb = G.reshape(2, r, 3, r).permute(0, 2, 1, 3)
    expect = (Wb.transpose(-1, -2) @ Gb + Gb).sum(1)
    assert torch.allclose(T.grad, expect, atol=1e-5)
    lin = nn.Sequential(nn.Linear(12, 8, bias=False))
    lin[0].weight.data = W.clone()
    adapt.attach(lin, "bat", targets=["0"], r=r)
    lin[0].adapter.T.data = T.detach().clone()
    adapt.fold(lin, unload=False)
    adapt.unfold(lin)
    assert (lin[0].weight_2d() - W).abs().max() < 1e-4
    with pytest.raises(ConfigError):
        adapt.attach(nn.Sequential(nn.Linear(10, 8)), "bat", targets=["0"], r=4)


def test_projected_adamw():
    from weightlab.adapt.gradnormlorp import ProjectedAdamW

    torch.manual_seed(0)
    # rank < M: state lives in r x N; the projector is orthonormal
    c = nn.Parameter(torch.randn(6, 10))
    oc = ProjectedAdamW([c], lr=1e-2, rank=3)
    c.grad = torch.randn(6, 10)
    oc.step()
    st = oc.state[c]
    P = st["P"][1]
    assert torch.allclose(P.t() @ P, torch.eye(3), atol=1e-5)
    assert st["m"].numel() == 3 * 10


def test_projected_adamw_identity_projection_equals_adamw(monkeypatch):
    """Adam's normalization is elementwise, so a rotated full-rank basis changes it; with the identity
    basis (the complete projection aligned with the coordinates) projected Adam == AdamW exactly."""
    from weightlab.adapt.gradnormlorp import ProjectedAdamW

    monkeypatch.setattr(ProjectedAdamW, "_projector", staticmethod(lambda G, rank, pt: ("left", torch.eye(G.shape[0]))))
    torch.manual_seed(0)
    q1 = nn.Parameter(torch.randn(6, 10))
    q2 = nn.Parameter(q1.detach().clone())
    a = ProjectedAdamW([q1], lr=1e-2, rank=6, scale=1.0)
    b = torch.optim.AdamW([q2], lr=1e-2, weight_decay=0.0)
    for _ in range(4):
        for q, o in ((q1, a), (q2, b)):
            o.zero_grad()
            (q.sin().sum() + (q ** 2).sum()).backward()
            o.step()
    assert torch.allclose(q1, q2, atol=1e-6)


def test_registry_lists_methods():
    from weightlab.registry import list_methods

    names = {s.name for s in list_methods("adapt")}
    assert {"lora", "dora", "ia3", "vera", "loha", "lokr", "pissa", "sorsa", "bone", "bat", "gradnormlorp"} <= names


def test_old_fold_names_still_work_and_warn():
    import warnings

    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    adapt.attach(m, "lora", r=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        adapt.merge(m)
    assert any("adapt.fold" in str(x.message) for x in w)
    assert isinstance(m[0], torch.nn.Linear)


def test_package_level_verbs():
    import weightlab as wl
    from weightlab.adapt.training import tune
    from weightlab.inspect.heads import analyze_heads
    from weightlab.merge.api import load_merge_config

    assert wl.tune is tune and wl.heads is analyze_heads and wl.load_merge_config is load_merge_config
    assert callable(wl.neurons) and callable(wl.prune) and callable(wl.quantize)
