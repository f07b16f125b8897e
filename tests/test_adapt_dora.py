"""DoRA: PEFT's use_dora semantics (init, fold, detached norm, gradients and steps) and PEFT folders both ways."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlab import adapt
from weightlab.errors import ConfigError

peft = pytest.importorskip("peft")
from _peft_parity import adamw_lockstep, check_peft_export, tune_cli_roundtrip  # noqa: E402
from test_adapt import ids, perturb, tiny_llama  # noqa: E402
from test_tune_cli import base  # noqa: E402,F401  (the tiny Llama folder with a tokenizer, for the CLI test)

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def peft_dora(model, targets, **kw):
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **kw}
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=targets, use_dora=True, **kw))


def copy_from_peft(pm, model):
    """Put a PEFT DoRA model's A, B and m into the weightlab DoRA layers of the same names."""
    with torch.no_grad():
        for n, lay in adapt.adapter_layers(model).items():
            p = pm.base_model.model.get_submodule(n)
            a = lay.adapter
            a.lora_A.copy_(p.lora_A["default"].weight.reshape(a.lora_A.shape))
            a.lora_B.copy_(p.lora_B["default"].weight.reshape(a.lora_B.shape))
            a.magnitude.copy_(p.lora_magnitude_vector["default"].weight.reshape(-1))


def peft_tensors(pm, name):
    p = pm.base_model.model.get_submodule(name)
    return p.lora_A["default"].weight, p.lora_B["default"].weight, p.lora_magnitude_vector["default"].weight


def test_defaults_are_peft_and_init_leaves_the_output_unchanged():
    from weightlab.registry import get_method

    spec = get_method("adapt", "dora")
    ref = peft.LoraConfig()
    d = spec.defaults()
    assert (d["r"], d["alpha"], d["dropout"], d["rslora"]) == (ref.r, ref.lora_alpha, ref.lora_dropout, ref.use_rslora)
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, "dora", targets="all-linear", r=4, alpha=8)
    assert torch.equal(m(x).logits, y0)  # m = ||W0||_c exactly, B = 0: the layer computes base(x) + 0
    for lay in adapt.adapter_layers(m).values():
        a = lay.adapter
        assert not a.lora_B.any() and a.magnitude.shape == (lay.out_features,)
        assert torch.allclose(a.magnitude, lay.weight_2d().norm(dim=1), rtol=1e-6)
    assert adapt.count_trainable(m) == sum(4 * (lay.out_features + lay.in_features) + lay.out_features
                                           for lay in adapt.adapter_layers(m).values())


def test_fold_is_the_dora_weight_and_unfold_restores_w0_bit_exactly():
    m = tiny_llama()
    sd0 = copy.deepcopy(m.state_dict())
    x = ids()
    adapt.attach(m, "dora", targets="all-linear", r=4, alpha=8)
    perturb(m)
    W0 = {n: lay.weight_2d().detach().clone() for n, lay in adapt.adapter_layers(m).items()}
    y = m(x).logits
    for n, lay in adapt.adapter_layers(m).items():
        a = lay.adapter
        V = W0[n].double() + 2.0 * (a.lora_B.double() @ a.lora_A.double())  # s = alpha / r = 2
        Wd = (a.magnitude.double()[:, None] * V / V.norm(dim=1, keepdim=True)).detach()
        assert (lay.merged_weight().double() - Wd).abs().max() <= 1e-6 * Wd.abs().max(), n
        xi = torch.randn(6, lay.in_features, dtype=torch.float64)
        ref = F.linear(xi, Wd)  # the formula in float64 against the layer's own (float32) forward
        assert (lay(xi.float()).detach().double() - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), n
    adapt.fold(m, unload=False)
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.unfold(m)
    for n, lay in adapt.adapter_layers(m).items():
        assert torch.equal(lay.weight_2d(), W0[n]), n
    assert torch.equal(m(x).logits, y)
    folded = copy.deepcopy(m)
    adapt.fold(folded)  # unload: plain Linear layers with W'
    assert not adapt.adapter_layers(folded) and torch.allclose(folded(x).logits, y, atol=1e-5)
    adapt.fold(m, unload=False)
    adapt.detach(m)  # detach after a kept fold also gives W0 back
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd0[k]), k
    lay = adapt.attach(tiny_llama(), "dora", targets=["q_proj"]).model.layers[0].self_attn.q_proj
    with pytest.raises(ConfigError, match="does not determine W0"):
        lay.method.unmerge(lay, lay.weight_2d().float())


def test_the_norm_is_a_constant_for_the_gradient():
    """Paper section 4.3 / PEFT: ||W0 + sBA||_c is detached; m, A, B get that form's gradients (not the full one)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12))
    adapt.attach(net, "dora", targets=["0"], r=4, alpha=8)
    perturb(net)
    lay, x = net[0], torch.randn(5, 16)
    (net(x) ** 2).sum().backward()
    a = lay.adapter
    got = [a.lora_A.grad, a.lora_B.grad, a.magnitude.grad]

    def reference(detached):
        A, B, mag = (t.detach().clone().requires_grad_(True) for t in (a.lora_A, a.lora_B, a.magnitude))
        V = lay.base_layer.weight + 2.0 * (B @ A)
        n = V.norm(dim=1, keepdim=True)
        W = mag[:, None] * V / (n.detach() if detached else n)
        (F.linear(x, W, lay.base_layer.bias) ** 2).sum().backward()
        return [A.grad, B.grad, mag.grad]

    for g, r in zip(got, reference(True)):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()
    full = reference(False)
    assert not torch.allclose(got[1], full[1], rtol=1e-3, atol=1e-5)  # the test can tell the two apart


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float64, 0.0), (torch.float32, 0.1)])
def test_gradients_and_adamw_steps_match_peft(dtype, dropout):
    base = tiny_llama().to(dtype)
    pm = peft_dora(base, TARGETS, lora_dropout=dropout)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B != 0 so that A gets a gradient; m stays PEFT's init ||W0||_c
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    m = copy.deepcopy(base)
    adapt.attach(m, "dora", targets=TARGETS, r=4, alpha=8, dropout=dropout)
    copy_from_peft(pm, m)

    def grads(tol):
        for n, lay in adapt.adapter_layers(m).items():
            a = lay.adapter
            for mine, theirs in zip((a.lora_A, a.lora_B, a.magnitude), peft_tensors(pm, n)):
                assert mine.grad.abs().max() > 0
                err = (mine.grad - theirs.grad.reshape(mine.shape)).abs().max()
                assert err <= 10 * tol * theirs.grad.abs().max(), (n, float(err))

    # the same dropout masks: both draw one mask per layer, in layer order
    tol = adamw_lockstep(pm, m, dtype, grads, lr=1e-3, seeded_dropout=True)
    for n, lay in adapt.adapter_layers(m).items():
        a = lay.adapter
        for mine, theirs in zip((a.lora_A, a.lora_B, a.magnitude), peft_tensors(pm, n)):
            assert (mine - theirs.reshape(mine.shape)).abs().max() <= tol, n


def _same_logits(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("cfg,targets", [(dict(r=4, alpha=8), ["q_proj", "v_proj", "up_proj"]),
                                         (dict(r=4, alpha=8, rslora=True), ["q_proj", "v_proj", "up_proj"]),
                                         (dict(r=20, alpha=16), ["q_proj", "k_proj"])])  # ranks 20 and 16: padded
def test_export_loads_in_peft_with_equal_logits(cfg, targets, tmp_path):
    from safetensors.torch import load_file

    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, "dora", targets=targets, **cfg)
    perturb(m)
    # one rank: exactly the keys PEFT's save_pretrained writes (mixed ranks are padded, so only loading is compared)
    ref = peft_dora(base, targets, use_rslora=cfg.get("rslora", False)) if cfg["r"] == 4 else None
    conf = check_peft_export(m, base, x, m(x).logits, tmp_path, reference=ref, same=_same_logits)
    assert conf["use_dora"] is True
    if cfg["r"] == 4:  # PEFT's own hyperparameters
        assert (conf["r"], conf["lora_alpha"], conf["use_rslora"]) == (4, 8, cfg.get("rslora", False))
        sd = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        assert any(k.endswith(".lora_magnitude_vector") for k in sd)


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_dora_adapter(rslora, tmp_path):
    base = tiny_llama()
    pm = peft_dora(base, ["k_proj", "gate_proj"], r=4, lora_alpha=16, init_lora_weights=False, use_rslora=rslora)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # magnitudes away from ||W0 + sBA||_c, so that m matters
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    assert not _same_logits(y, base(x).logits, atol=1e-3)
    pm.save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_dora"] is True
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    layers = adapt.adapter_layers(m)
    assert len(layers) == 4 and {lay.method.name for lay in layers.values()} == {"dora"}
    assert _same_logits(m(x).logits, y)
    # and back out: the round trip keeps PEFT's tensors
    adapt.export_peft(m, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "again")).eval()
    assert _same_logits(pm2(input_ids=x).logits, y)
    adapt.fold(m)
    assert _same_logits(m(x).logits, y)


def test_import_refuses_a_dora_folder_without_magnitudes(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = peft_dora(tiny_llama(), ["q_proj"])
    pm.save_pretrained(str(tmp_path / "p"))
    f = tmp_path / "p" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "magnitude" not in k}, str(f))
    with pytest.raises(ConfigError, match="lora_magnitude_vector"):
        adapt.import_peft(tiny_llama(), tmp_path / "p")


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(12, 10)
    with torch.no_grad():
        c.bias.normal_()  # a bias, so that subtracting it from the base output is tested
    return c, torch.randn(4, 10), {"fan_in_fan_out": True}


def _conv2d():
    return nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 8, 8), {}


@pytest.mark.parametrize("make", [_conv1d, _conv2d], ids=["hf-conv1d", "conv2d"])
def test_conv_layers_match_peft(make, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    layer, x, extra = make()
    base = _Net(layer)
    pm = peft_dora(base, ["layer"], r=3, lora_alpha=6, init_lora_weights=False, **extra)
    with torch.no_grad():
        p = pm.base_model.model.layer.lora_magnitude_vector["default"].weight
        p.mul_(1 + 0.3 * torch.rand(p.shape))
    m = copy.deepcopy(base)
    adapt.attach(m, "dora", targets=["layer"], r=3, alpha=6)
    copy_from_peft(pm, m)
    y = pm(x)
    assert torch.allclose(m(x), y, atol=1e-5)
    (pm(x) ** 2).sum().backward()
    (m(x) ** 2).sum().backward()
    a = m.layer.adapter
    for mine, theirs in zip((a.lora_A, a.lora_B, a.magnitude), peft_tensors(pm, "layer")):
        assert (mine.grad - theirs.grad.reshape(mine.shape)).abs().max() <= 1e-5 * theirs.grad.abs().max()
    # export: PEFT's loader takes the keys and shapes (Conv2d magnitude (1, out, 1, 1))
    adapt.export_peft(m, tmp_path / "peft")
    fresh = peft_dora(base, ["layer"], r=3, lora_alpha=6, **extra)
    res = peft.set_peft_model_state_dict(fresh, load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert not res.unexpected_keys
    assert torch.allclose(fresh(x), y, atol=1e-5)
    folded = adapt.fold(copy.deepcopy(m))
    assert type(folded.layer) is type(layer) and torch.allclose(folded(x), y, atol=1e-5)


def test_tune_cli_trains_dora_and_exports_it_to_peft(base, tmp_path):  # noqa: F811
    conf, ref = tune_cli_roundtrip(base, tmp_path, "dora", "--rank", "4")
    assert conf["config"]["r"] == 4
    lay = next(iter(adapt.adapter_layers(ref).values()))
    assert not torch.allclose(lay.adapter.magnitude, lay.weight_2d().norm(dim=1))  # m trained
