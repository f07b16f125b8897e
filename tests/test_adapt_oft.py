"""OFT and BOFT: PEFT's OFT / BOFT semantics (tensor names and shapes, Cayley forms, COFT, block sharing, butterfly
factors, gradients and AdamW steps), exact orthogonality, fold, and PEFT folders both ways."""
import copy

import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.errors import ConfigError
from weightlab.tensor.cayley import butterfly_apply, butterfly_perm, cayley, coft_project, skew_from_upper

peft = pytest.importorskip("peft")
from _peft_parity import adamw_lockstep, check_peft_export, tune_cli_roundtrip  # noqa: E402
from test_adapt import ids, perturb, tiny_llama  # noqa: E402
from test_tune_cli import base  # noqa: E402,F401  (the tiny Llama folder with a tokenizer, for the CLI test)

TARGETS = ["q_proj", "v_proj", "down_proj"]
# (method, weightlab config, PEFT config)
CASES = [("oft", dict(block_size=8), dict(oft_block_size=8)),
         ("oft", dict(block_size=8, cayley_neumann=False), dict(oft_block_size=8, use_cayley_neumann=False)),
         ("oft", dict(block_size=0, blocks=4, block_share=True), dict(r=4, oft_block_size=0, block_share=True)),
         ("oft", dict(block_size=4, coft=True, eps=0.05), dict(oft_block_size=4, coft=True, eps=0.05)),
         ("boft", dict(block_size=4), dict(boft_block_size=4)),
         ("boft", dict(block_size=4, n_butterfly_factor=2), dict(boft_block_size=4, boft_n_butterfly_factor=2)),
         ("boft", dict(block_size=0, block_num=8, n_butterfly_factor=3),
          dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3))]
IDS = ["oft-neumann", "oft-exact", "oft-shared", "oft-coft", "boft", "boft-2-factors", "boft-3-factors"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(autouse=True)
def peft_boft_without_cuda(monkeypatch):
    """PEFT builds BOFT's butterfly factors only through its CUDA extension (else it silently keeps one factor).
    Here: PEFT's own CPU path (get_fbd_cuda() falsy, no compile attempt) is replaced, only where more than one
    factor is asked for, by the extension's definition (one block-diagonal matrix per factor) in torch."""
    from peft.tuners.boft import layer as bl

    real_update = bl.Linear.update_layer

    def fbd(R):
        return torch.stack([torch.block_diag(*list(r)) for r in R])

    monkeypatch.setattr(bl.FastBlockDiag, "apply", staticmethod(fbd))
    monkeypatch.setattr(bl, "get_fbd_cuda", lambda: None)

    def update(self, adapter_name, config, **kw):
        monkeypatch.setattr(bl, "get_fbd_cuda", (lambda: True) if config.boft_n_butterfly_factor > 1 else
                            (lambda: None))
        return real_update(self, adapter_name, config, **kw)

    monkeypatch.setattr(bl.Linear, "update_layer", update)


def peft_model(method, model, targets=TARGETS, **kw):
    cfg = peft.OFTConfig if method == "oft" else peft.BOFTConfig
    return peft.get_peft_model(copy.deepcopy(model), cfg(target_modules=list(targets), **kw))


def peft_params(pm, method, name):
    lay = pm.base_model.model.get_submodule(name)
    if method == "oft":
        return {"oft_R": lay.oft_R["default"].weight}
    return {"boft_R": lay.boft_R["default"], "boft_s": lay.boft_s["default"]}


def copy_from_peft(pm, method, model):
    with torch.no_grad():
        for n, lay in adapt.adapter_layers(model).items():
            theirs = peft_params(pm, method, n)
            assert {k: v.shape for k, v in lay.adapter.named_parameters()} == {k: v.shape for k, v in theirs.items()}
            for k, v in theirs.items():
                getattr(lay.adapter, k).copy_(v)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_defaults_are_peft_and_init_leaves_the_output_unchanged(method):
    from weightlab.registry import get_method

    d = get_method("adapt", method).defaults()
    if method == "oft":
        ref = peft.OFTConfig()
        assert (d["block_size"], d["blocks"], d["cayley_neumann"], d["neumann_terms"], d["coft"], d["eps"],
                d["block_share"]) == (ref.oft_block_size, ref.r, ref.use_cayley_neumann, ref.num_cayley_neumann_terms,
                                      ref.coft, ref.eps, ref.block_share)
    else:
        ref = peft.BOFTConfig()
        assert (d["block_size"], d["block_num"], d["n_butterfly_factor"], d["dropout"]) == \
            (ref.boft_block_size, ref.boft_block_num, ref.boft_n_butterfly_factor, ref.boft_dropout)
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, method, targets=TARGETS)
    assert torch.equal(m(x).logits, y0)
    assert adapt.count_trainable(m) == sum(p.numel() for p in peft_model(method, tiny_llama()).parameters()
                                           if p.requires_grad)


def test_cayley_is_orthogonal_and_the_neumann_series_is_peft_s_approximation():
    g = torch.Generator().manual_seed(0)
    for b in (2, 5, 16):
        S = skew_from_upper(torch.randn(3, b * (b - 1) // 2, generator=g), b)
        R = cayley(S)
        eye = torch.eye(b).expand(3, b, b)
        assert (R @ R.transpose(1, 2) - eye).abs().max() < 2e-6 * b  # exact for any (large) S, fp32 rounding
        assert torch.allclose(R, torch.linalg.solve(eye + S, eye - S, left=False))
        small = (1e-2 * S / S.norm()).double()
        # the series of (I + S)(I - S)^-1 = the exact form of -S, to O(||S||^5)
        assert (cayley(small, 5) - cayley(-small)).abs().max() < 1e-8
        assert (cayley(small, 5) - cayley(small)).abs().max() > 1e-3 * small.abs().max()
    S = skew_from_upper(torch.tensor([[0.3]]), 2)  # 2x2: the series written out, 5 and 4 (= 3) terms
    q = S[0]
    assert torch.allclose(cayley(S, 5)[0], torch.eye(2) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q)
    assert torch.allclose(cayley(S, 4)[0], cayley(S, 3)[0])


@pytest.mark.parametrize("method,cfg", [("oft", dict(block_size=8, cayley_neumann=False)),
                                        ("oft", dict(block_size=4, block_share=True, cayley_neumann=False)),
                                        ("boft", dict(block_size=2, n_butterfly_factor=3))])
def test_rotation_is_orthogonal_and_fold_keeps_angles_between_neurons(method, cfg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 12))
    adapt.attach(net, method, **cfg)
    with torch.no_grad():
        for k, p in net[0].adapter.named_parameters():
            p.copy_(torch.ones_like(p) if k == "boft_s" else torch.randn(p.shape))  # large angles; BOFT s = 1
    lay = net[0]
    M = lay.method.dense_rotation(lay)
    assert (M @ M.t() - torch.eye(32)).abs().max() < 1e-5 and (M - torch.eye(32)).abs().max() > 0.5
    W = lay.weight_2d().detach().clone()
    x = torch.randn(5, 32)
    y = net(x)
    adapt.fold(net, unload=False)
    W1 = lay.weight_2d()
    assert torch.allclose(W1 @ W1.t(), W @ W.t(), atol=1e-5)  # hyperspherical energy kept: only a rotation
    assert not torch.allclose(W1, W, atol=1e-2)
    assert torch.allclose(net(x), y, atol=1e-5)
    adapt.unfold(net)
    assert torch.equal(lay.weight_2d(), W)  # the copy: bit for bit


def test_hand_computed_butterfly():
    """d = 8, blocks of 2, two factors: factor 0 pairs (0,1),(2,3)..., factor 1 pairs inputs 2 apart (0,2),(1,3),...
    A = [[0, 2], [0, 0]] -> S = [[0, 1], [-1, 0]] -> Cayley R = (I - S)(I + S)^-1 = [[0, -1], [1, 0]]."""
    assert butterfly_perm(8, 4, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_perm(8, 4, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(8))
        lin.bias.copy_(torch.arange(8.0))
    net = nn.Sequential(lin)
    adapt.attach(net, "boft", block_size=2, n_butterfly_factor=2)
    a = net[0].adapter
    with torch.no_grad():
        a.boft_R[0, 0] = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # factor 0, block 0: inputs (0, 1)
        a.boft_R[1, 0] = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # factor 1, block 0: inputs (0, 2)
        a.boft_s[0, 0] = 3.0
    e = torch.eye(8)
    y = net(e) - torch.arange(8.0)  # rows: e_i M W^T * s
    want = torch.eye(8)
    want[0] = -e[2]  # e_0 M_1 = -e_2, untouched by M_0
    want[2] = -e[1]  # e_2 M_1 = e_0, e_0 M_0 = -e_1
    want[1] = e[0]  # e_1 M_1 = e_1, e_1 M_0 = e_0
    want[:, 0] *= 3.0  # output 0 scaled by s_0
    assert torch.allclose(y, want, atol=1e-6)
    R = a.boft_R.detach()
    R = cayley(0.5 * (R - R.transpose(-1, -2)).reshape(-1, 2, 2)).reshape(2, 4, 2, 2)
    perms = [butterfly_perm(8, 4, 2, i) for i in range(2)]
    assert torch.allclose(butterfly_apply(butterfly_apply(e, R, perms), R, perms, transpose=True), e, atol=1e-6)


@pytest.mark.parametrize("method,cfg,pcfg", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_and_adamw_steps_match_peft(method, cfg, pcfg, dtype):
    base = tiny_llama().to(dtype)
    pm = peft_model(method, base, init_weights=False, **pcfg)  # PEFT's random init: N(0, 0.1), s ~ N(1, 0.1)
    m = copy.deepcopy(base)
    adapt.attach(m, method, targets=TARGETS, **cfg)
    copy_from_peft(pm, method, m)

    def grads(tol):
        for n, lay in adapt.adapter_layers(m).items():
            theirs = peft_params(pm, method, n)
            for k, p in lay.adapter.named_parameters():
                assert p.grad.abs().max() > 0, (n, k)
                assert (p.grad - theirs[k].grad).abs().max() <= 10 * tol * theirs[k].grad.abs().max(), (n, k)

    tol = adamw_lockstep(pm, m, dtype, grads)
    for n, lay in adapt.adapter_layers(m).items():
        theirs = peft_params(pm, method, n)
        for k, p in lay.adapter.named_parameters():
            assert (p - theirs[k]).abs().max() <= 10 * tol, (n, k)


def test_coft_keeps_every_block_within_eps():
    eps = 1e-3
    base = tiny_llama()
    pm = peft_model("oft", base, oft_block_size=8, coft=True, eps=eps)
    m = copy.deepcopy(base)
    adapt.attach(m, "oft", targets=TARGETS, block_size=8, coft=True, eps=eps)
    adamw_lockstep(pm, m, torch.float32, lambda tol: None, steps=4, lr=5e-2)  # large steps: the bound binds
    m.eval()
    pm.eval()
    m(ids())  # the projection runs before each use
    pm(input_ids=ids())
    for n, lay in adapt.adapter_layers(m).items():
        q = lay.adapter.oft_R.detach()
        norms = torch.linalg.matrix_norm(skew_from_upper(q, 8))
        bound = eps / q.shape[0] ** 0.5
        assert norms.max() <= bound * (1 + 1e-5) and norms.min() > 0.5 * bound, n
        assert torch.allclose(q, peft_params(pm, "oft", n)["oft_R"], atol=1e-7), n
        assert torch.allclose(coft_project(q, 8, eps), q, atol=1e-10)  # a fixed point of the projection


@pytest.mark.parametrize("method,cfg,pcfg", [CASES[0], CASES[2], CASES[3], CASES[5]],
                         ids=["oft", "oft-shared", "oft-coft", "boft-2-factors"])
def test_export_loads_in_peft_with_equal_logits(method, cfg, pcfg, tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, method, targets=TARGETS, **cfg)
    perturb(m)
    if cfg.get("coft"):  # perturb moved the blocks past eps: the first forward projects them back, as PEFT's
        m(x)
    conf = check_peft_export(m, base, x, m(x).logits, tmp_path, reference=peft_model(method, base, **pcfg))
    assert conf["peft_type"] == method.upper()


@pytest.mark.parametrize("method,pcfg", [("oft", dict(oft_block_size=16)), ("oft", dict(r=2, oft_block_size=0)),
                                         ("boft", dict(boft_block_size=8, boft_n_butterfly_factor=2))])
def test_import_peft_adapter(method, pcfg, tmp_path):
    base = tiny_llama()
    pm = peft_model(method, base, ["k_proj", "gate_proj"], init_weights=False, **pcfg)
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    assert not torch.allclose(y, base(x).logits, atol=1e-3)
    pm.save_pretrained(str(tmp_path / "p"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    layers = adapt.adapter_layers(m)
    assert len(layers) == 4 and {lay.method.name for lay in layers.values()} == {method}
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.fold(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5)


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_conv2d_boft_matches_peft_and_oft_folds_as_peft_merges(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = _Net(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(2, 4, 8, 8)
    pm = peft_model("boft", base, ["layer"], boft_block_size=6, init_weights=False)
    m = copy.deepcopy(base)
    adapt.attach(m, "boft", targets=["layer"], block_size=6)
    copy_from_peft(pm, "boft", m)
    y = pm(x)
    assert torch.allclose(m(x), y, atol=1e-5)
    (pm(x) ** 2).sum().backward()
    (m(x) ** 2).sum().backward()
    theirs = peft_params(pm, "boft", "layer")
    for k, p in m.layer.adapter.named_parameters():
        assert (p.grad - theirs[k].grad).abs().max() <= 1e-5 * theirs[k].grad.abs().max(), k
    adapt.export_peft(m, tmp_path / "p")
    fresh = peft_model("boft", base, ["layer"], boft_block_size=6)
    assert not peft.set_peft_model_state_dict(fresh, load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
                                              ).unexpected_keys
    assert torch.allclose(fresh(x), y, atol=1e-5)
    # OFT: PEFT 0.21's unmerged Conv2d forward is not its merge (F.fold sums overlapping patches); ours is the merge
    po = peft_model("oft", base, ["layer"], oft_block_size=6, init_weights=False)
    mo = copy.deepcopy(base)
    adapt.attach(mo, "oft", targets=["layer"], block_size=6)
    copy_from_peft(po, "oft", mo)
    merged = po.merge_and_unload()
    assert torch.allclose(mo(x), merged(x), atol=1e-5)
    folded = adapt.fold(copy.deepcopy(mo))
    assert type(folded.layer) is nn.Conv2d and torch.allclose(folded.layer.weight, merged.layer.weight, atol=1e-6)


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        adapt.attach(tiny_llama(), "oft", targets=TARGETS, block_size=8, blocks=4)
    with pytest.raises(ConfigError, match="block_size 12 does not divide"):
        adapt.attach(tiny_llama(), "boft", targets=TARGETS, block_size=12)
    with pytest.raises(ConfigError, match="even"):
        adapt.attach(tiny_llama(), "boft", targets=TARGETS, block_size=0, block_num=32, n_butterfly_factor=2)
    with pytest.raises(ConfigError, match="ungrouped"):  # PEFT's OFT/BOFT layouts have no groups
        adapt.attach(_Net(nn.Conv2d(4, 8, 3, groups=2)), "oft", targets=["layer"], block_size=6)
    with pytest.warns(UserWarning, match="using 16"):  # PEFT's adjustment to the nearest divisor
        m = adapt.attach(tiny_llama(), "oft", targets=["q_proj"], block_size=15)
    assert next(iter(adapt.adapter_layers(m).values())).adapter.oft_R.shape == (2, 120)


@pytest.mark.parametrize("method,param", [("oft", "block_size=8"), ("boft", "block_size=8")])
def test_tune_cli_trains_and_exports_to_peft(method, param, base, tmp_path):  # noqa: F811
    conf, _ = tune_cli_roundtrip(base, tmp_path, method, "-p", param)
    assert conf["config"]["block_size"] == 8
