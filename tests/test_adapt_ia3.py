"""(IA)^3: PEFT's IA3 semantics (init, exact fold, output vs input scaling, gradients) and PEFT folders both ways."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlab import adapt

peft = pytest.importorskip("peft")
from _peft_parity import adamw_lockstep, check_peft_export, tune_cli_roundtrip  # noqa: E402
from test_adapt import ids, perturb, tiny_llama  # noqa: E402
from test_tune_cli import base  # noqa: E402,F401  (the tiny Llama folder with a tokenizer, for the CLI test)

TARGETS = ["k_proj", "v_proj", "down_proj"]  # PEFT's IA3 default for Llama; down_proj is feed-forward


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def peft_ia3(model, targets=TARGETS, ff=("down_proj",), **kw):
    cfg = peft.IA3Config(target_modules=list(targets), feedforward_modules=list(ff), **kw)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


def randomize(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def copy_from_peft(pm, model):
    with torch.no_grad():
        for n, lay in adapt.adapter_layers(model).items():
            lay.adapter.ia3_l.copy_(pm.base_model.model.get_submodule(n).ia3_l["default"].reshape(-1))


def test_defaults_are_peft_and_init_leaves_the_output_unchanged():
    from weightlab.adapt.training import _default_targets

    m = tiny_llama()
    assert _default_targets(m, "ia3") == TARGETS and _default_targets(m, "lora")[0] == "q_proj"
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, "ia3", targets=TARGETS)
    assert torch.equal(m(x).logits, y0)  # l = 1 exactly: x * 1 and y * 1 are bit-identical
    layers = adapt.adapter_layers(m)
    for n, lay in layers.items():
        ff = n.endswith("down_proj")
        assert lay.adapter.feedforward == ff
        assert lay.adapter.ia3_l.shape == ((lay.in_features,) if ff else (lay.out_features,))
        assert torch.equal(lay.adapter.ia3_l, torch.ones_like(lay.adapter.ia3_l))
    pm = peft_ia3(tiny_llama())
    assert adapt.count_trainable(m) == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_output_and_input_scaling_and_exact_fold_with_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 7))
    sd0 = copy.deepcopy(net.state_dict())
    adapt.attach(net, "ia3", targets=["0", "1"], feedforward_modules=["1"])
    perturb(net)
    x = torch.randn(5, 10)
    a0, a1 = net[0].adapter, net[1].adapter
    W0, b0, W1, b1 = (t.detach().clone() for t in (net[0].weight_2d(), net[0].base_layer.bias,
                                                   net[1].weight_2d(), net[1].base_layer.bias))
    h = F.linear(x, W0, b0) * a0.ia3_l  # output scale (bias scaled too)
    ref = F.linear(h * a1.ia3_l, W1, b1)  # input scale
    y = net(x)
    assert torch.allclose(y, ref, atol=1e-6)
    adapt.fold(net, unload=False)
    assert torch.allclose(net[0].weight_2d(), W0 * a0.ia3_l[:, None], atol=1e-7)  # rows of W
    assert torch.allclose(net[0].base_layer.bias, b0 * a0.ia3_l, atol=1e-7)
    assert torch.allclose(net[1].weight_2d(), W1 * a1.ia3_l[None, :], atol=1e-7)  # columns of W
    assert torch.equal(net[1].base_layer.bias, b1)  # an input scale leaves the bias
    assert torch.allclose(net(x), y, atol=1e-5)
    adapt.unfold(net)  # bit for bit, bias included
    for lay, W, b in ((net[0], W0, b0), (net[1], W1, b1)):
        assert torch.equal(lay.weight_2d(), W) and torch.equal(lay.base_layer.bias, b)
    adapt.fold(net, unload=False)
    adapt.detach(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd0[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_and_adamw_steps_match_peft(dtype):
    base = tiny_llama().to(dtype)
    pm = peft_ia3(base)
    randomize(pm)
    m = copy.deepcopy(base)
    adapt.attach(m, "ia3", targets=TARGETS)
    copy_from_peft(pm, m)

    def grads(tol):
        for n, lay in adapt.adapter_layers(m).items():
            g, gp = lay.adapter.ia3_l.grad, pm.base_model.model.get_submodule(n).ia3_l["default"].grad
            assert g.abs().max() > 0
            assert (g - gp.reshape(-1)).abs().max() <= 10 * tol * gp.abs().max(), n

    tol = adamw_lockstep(pm, m, dtype, grads)
    for n, lay in adapt.adapter_layers(m).items():
        theirs = pm.base_model.model.get_submodule(n).ia3_l["default"].reshape(-1)
        assert (lay.adapter.ia3_l - theirs).abs().max() <= tol, n


def test_export_loads_in_peft_with_equal_logits_and_peft_merge_equals_fold(tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, "ia3", targets=TARGETS)
    perturb(m)
    conf = check_peft_export(m, base, x, m(x).logits, tmp_path, reference=peft_ia3(base))
    assert conf["peft_type"] == "IA3" and len(conf["target_modules"]) == 6
    assert all(n.endswith("down_proj") for n in conf["feedforward_modules"]) and len(conf["feedforward_modules"]) == 2


@pytest.mark.parametrize("ff", [["down_proj"], "model\\.layers\\.\\d+\\.mlp\\.down_proj"], ids=["list", "regex"])
def test_import_peft_ia3_adapter(ff, tmp_path):
    base = tiny_llama()
    if isinstance(ff, list):
        pm = peft_ia3(base)
    else:  # regexes for both, as PEFT allows
        cfg = peft.IA3Config(target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=ff)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize(pm)
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    assert not torch.allclose(y, base(x).logits, atol=1e-3)
    pm.save_pretrained(str(tmp_path / "p"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    layers = adapt.adapter_layers(m)
    assert len(layers) == 6 and {lay.method.name for lay in layers.values()} == {"ia3"}
    assert sum(lay.adapter.feedforward for lay in layers.values()) == 2
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.export_peft(m, tmp_path / "again")  # and back out
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "again")).eval()
    assert torch.allclose(pm2(input_ids=x).logits, y, atol=1e-5)
    adapt.fold(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5)


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("kind", ["hf-conv1d", "conv2d"])
def test_conv_layers_match_peft(kind, feedforward, tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if kind == "conv2d":
        layer, x, extra = nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 8, 8), {}
    else:
        layer, x, extra = Conv1D(12, 10), torch.randn(4, 10), {"fan_in_fan_out": True}
    with torch.no_grad():
        layer.bias.normal_()
    base = _Net(layer)
    pm = peft_ia3(base, targets=["layer"], ff=["layer"] if feedforward else [], **extra)
    randomize(pm)
    m = copy.deepcopy(base)
    adapt.attach(m, "ia3", targets=["layer"], feedforward_modules=["layer"] if feedforward else [])
    copy_from_peft(pm, m)
    y = pm(x)
    assert torch.allclose(m(x), y, atol=1e-5)
    (pm(x) ** 2).sum().backward()
    (m(x) ** 2).sum().backward()
    g, gp = m.layer.adapter.ia3_l.grad, pm.base_model.model.layer.ia3_l["default"].grad
    assert (g - gp.reshape(-1)).abs().max() <= 1e-5 * gp.abs().max()
    adapt.export_peft(m, tmp_path / "p")  # PEFT's loader takes the keys, shapes and config
    from safetensors.torch import load_file

    conf = peft.PeftConfig.from_pretrained(str(tmp_path / "p"))
    assert conf.fan_in_fan_out == (kind == "hf-conv1d") and bool(conf.feedforward_modules) == feedforward
    fresh = peft_ia3(base, targets=["layer"], ff=["layer"] if feedforward else [], **extra)
    res = peft.set_peft_model_state_dict(fresh, load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert not res.unexpected_keys
    assert torch.allclose(fresh(x), y, atol=1e-5)
    folded = adapt.fold(copy.deepcopy(m))
    assert type(folded.layer) is type(layer) and torch.allclose(folded(x), y, atol=1e-5)


def test_tune_cli_trains_ia3_on_pefts_default_targets(base, tmp_path):  # noqa: F811
    conf, ref = tune_cli_roundtrip(base, tmp_path, "ia3")
    assert {t.rsplit(".", 1)[1] for t in conf["targets"]} == set(TARGETS)
    assert any(not torch.equal(lay.adapter.ia3_l, torch.ones_like(lay.adapter.ia3_l))
               for lay in adapt.adapter_layers(ref).values())


@pytest.mark.parametrize("method,peft_type", [("ia3", "IA3"), ("vera", "VERA"), ("loha", "LOHA"), ("lokr", "LOKR")])
def test_recipe_tune_step_keeps_a_peft_folder_of_the_methods_own_type(method, peft_type, base, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from weightlab.recipe import Recipe, run_recipe

    out = tmp_path / "out"
    step = {"family": "adapt", "method": "tune", "params": {"method": method, "data": str(base / "text.txt"),
                                                            "steps": 2, "batch_size": 2, "seqlen": 16, "rank": 4,
                                                            "lr": 1e-2, "peft": True}}
    res = run_recipe(Recipe(model=str(base / "model"), output=str(out), steps=[step]), show_progress=False)
    assert [s.status for s in res.steps] == ["ran"]
    conf = json.loads((out / "step-01-adapter-peft" / "adapter_config.json").read_text())
    assert conf["peft_type"] == peft_type
    x = torch.tensor([[5, 6, 7, 8]])
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base / "model")),
                                        str(out / "step-01-adapter-peft")).eval()
    folded = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # the step's output: the adapter folded in
    with torch.no_grad():
        assert torch.allclose(folded(x).logits, pm(input_ids=x).logits, atol=1e-5)
