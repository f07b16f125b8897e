"""LoHa and LoKr: PEFT's LOHA / LOKR semantics (tensor names and shapes, init, gradients and steps, conv) and PEFT
folders both ways."""
import copy

import pytest
import torch
from torch import nn

from weightlab import adapt

peft = pytest.importorskip("peft")
from _peft_parity import adamw_lockstep, check_peft_export, tune_cli_roundtrip  # noqa: E402
from test_adapt import ids, perturb, tiny_llama  # noqa: E402
from test_tune_cli import base  # noqa: E402,F401  (the tiny Llama folder with a tokenizer, for the CLI test)

TARGETS = ["q_proj", "v_proj", "down_proj"]
PEFT_CFG = {"loha": lambda **kw: peft.LoHaConfig(**kw), "lokr": lambda **kw: peft.LoKrConfig(**kw)}
PREFIX = {"loha": "hada_", "lokr": "lokr_"}
# (method, weightlab config, PEFT config): LoKr with full W2, low-rank W2, and both factors low-rank
CASES = [("loha", dict(r=4, alpha=8), dict(r=4, alpha=8)),
         ("lokr", dict(r=8, alpha=4), dict(r=8, alpha=4)),
         ("lokr", dict(r=2, alpha=4), dict(r=2, alpha=4)),
         ("lokr", dict(r=1, alpha=2, decompose_both=True, decompose_factor=4),
          dict(r=1, alpha=2, decompose_both=True, decompose_factor=4))]
IDS = ["loha", "lokr-full-w2", "lokr-lowrank-w2", "lokr-both"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def peft_model(method, model, targets=TARGETS, **kw):
    return peft.get_peft_model(copy.deepcopy(model), PEFT_CFG[method](target_modules=list(targets), **kw))


def peft_params(pm, method, name):
    lay = pm.base_model.model.get_submodule(name)
    return {k: getattr(lay, k)["default"] for k in dir(lay) if k.startswith(PREFIX[method])
            and isinstance(getattr(lay, k, None), nn.ParameterDict) and "default" in getattr(lay, k)}


def randomize(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def copy_from_peft(pm, method, model):
    with torch.no_grad():
        for n, lay in adapt.adapter_layers(model).items():
            theirs = peft_params(pm, method, n)
            assert set(theirs) == {k for k, _ in lay.adapter.named_parameters()}, n
            for k, v in theirs.items():
                getattr(lay.adapter, k).copy_(v)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_defaults_are_peft_and_init_leaves_the_output_unchanged(method):
    from weightlab.adapt.lokr import factorization
    from weightlab.registry import get_method

    ref = PEFT_CFG[method]()
    d = get_method("adapt", method).defaults()
    assert (d["r"], d["alpha"]) == (ref.r, ref.alpha)
    if method == "lokr":
        assert (d["decompose_both"], d["decompose_factor"]) == (ref.decompose_both, ref.decompose_factor)
        from peft.tuners.lokr.layer import factorization as peft_factorization

        for n in (1, 7, 12, 32, 64, 96, 127, 128, 256, 576, 1536):
            for f in (-1, 2, 4, 8, 5):
                assert factorization(n, f) == peft_factorization(n, f), (n, f)
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, method, targets=TARGETS)
    assert torch.equal(m(x).logits, y0)
    assert adapt.count_trainable(m) == sum(p.numel() for p in peft_model(method, tiny_llama()).parameters()
                                           if p.requires_grad)


@pytest.mark.parametrize("method,cfg,pcfg", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensors_gradients_and_adamw_steps_match_peft(method, cfg, pcfg, dtype):
    base = tiny_llama().to(dtype)
    pm = peft_model(method, base, **pcfg)
    randomize(pm)
    m = copy.deepcopy(base)
    adapt.attach(m, method, targets=TARGETS, **cfg)
    for n, lay in adapt.adapter_layers(m).items():  # PEFT's names and shapes
        assert {k: v.shape for k, v in lay.adapter.named_parameters()} == \
            {k: v.shape for k, v in peft_params(pm, method, n).items()}, n
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


@pytest.mark.parametrize("method,cfg,pcfg", CASES, ids=IDS)
def test_export_loads_in_peft_with_equal_logits(method, cfg, pcfg, tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, method, targets=TARGETS, **cfg)
    perturb(m)
    conf = check_peft_export(m, base, x, m(x).logits, tmp_path, reference=peft_model(method, base, **pcfg))
    assert conf["peft_type"] == method.upper() and conf["r"] == cfg["r"]


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_import_peft_adapter_with_rank_pattern(method, tmp_path):
    base = tiny_llama()
    pm = peft_model(method, base, ["k_proj", "gate_proj"], r=4, alpha=16, init_weights=False,
                    rank_pattern={"gate_proj": 2}, alpha_pattern={"gate_proj": 3})
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    assert not torch.allclose(y, base(x).logits, atol=1e-3)
    pm.save_pretrained(str(tmp_path / "p"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    layers = adapt.adapter_layers(m)
    assert len(layers) == 4 and {lay.method.name for lay in layers.values()} == {method}
    assert {lay.method.cfg.r for lay in layers.values()} == {4, 2}
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.fold(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5)


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("method,cfg", [("loha", dict(r=3, alpha=6)), ("lokr", dict(r=4, alpha=2)),
                                        ("lokr", dict(r=1, alpha=2))], ids=["loha", "lokr-full", "lokr-lowrank"])
def test_conv2d_matches_peft(method, cfg, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = _Net(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(2, 4, 8, 8)
    pm = peft_model(method, base, ["layer"], **cfg)
    randomize(pm)
    m = copy.deepcopy(base)
    adapt.attach(m, method, targets=["layer"], **cfg)
    copy_from_peft(pm, method, m)
    y = pm(x)
    assert torch.allclose(m(x), y, atol=1e-5)
    (pm(x) ** 2).sum().backward()
    (m(x) ** 2).sum().backward()
    theirs = peft_params(pm, method, "layer")
    for k, p in m.layer.adapter.named_parameters():
        assert (p.grad - theirs[k].grad).abs().max() <= 1e-5 * theirs[k].grad.abs().max(), k
    adapt.export_peft(m, tmp_path / "p")
    fresh = peft_model(method, base, ["layer"], **cfg)
    res = peft.set_peft_model_state_dict(fresh, load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert not res.unexpected_keys
    assert torch.allclose(fresh(x), y, atol=1e-5)
    folded = adapt.fold(copy.deepcopy(m))
    assert type(folded.layer) is nn.Conv2d and torch.allclose(folded(x), y, atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_tune_cli_trains_and_exports_to_peft(method, base, tmp_path):  # noqa: F811
    conf, _ = tune_cli_roundtrip(base, tmp_path, method, "--rank", "4")
    assert conf["config"]["r"] == 4
