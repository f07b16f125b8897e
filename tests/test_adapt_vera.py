"""VeRA: PEFT's VERA semantics (shared projections bit-equal to PEFT's, init, fold, gradients and steps) and PEFT
folders both ways (with and without saved projections)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlab import adapt

peft = pytest.importorskip("peft")
from _peft_parity import adamw_lockstep, check_peft_export, tune_cli_roundtrip  # noqa: E402
from test_adapt import ids, perturb, tiny_llama  # noqa: E402
from test_tune_cli import base  # noqa: E402,F401  (the tiny Llama folder with a tokenizer, for the CLI test)

TARGETS = ["q_proj", "v_proj", "up_proj"]  # shapes (32, 32), (16, 32), (64, 32): A and B sliced per layer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def peft_vera(model, targets=TARGETS, **kw):
    kw = {"r": 4, **kw}
    return peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(target_modules=list(targets), **kw))


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def randomize(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "vera_lambda" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def copy_from_peft(pm, model):
    with torch.no_grad():
        for n, lay in adapt.adapter_layers(model).items():
            p = peft_layer(pm, n)
            lay.adapter.lambda_b.copy_(p.vera_lambda_b["default"])
            lay.adapter.lambda_d.copy_(p.vera_lambda_d["default"])


def test_defaults_projections_and_init_are_peft_and_leave_the_output_unchanged():
    from weightlab.registry import get_method

    ref = peft.VeraConfig()
    d = get_method("adapt", "vera").defaults()
    assert (d["r"], d["d_initial"], d["projection_prng_key"], d["save_projection"], d["dropout"]) == \
        (ref.r, ref.d_initial, ref.projection_prng_key, ref.save_projection, ref.vera_dropout)
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    adapt.attach(m, "vera", targets=TARGETS, r=4)
    assert torch.equal(m(x).logits, y0)  # lambda_b = 0
    pm = peft_vera(tiny_llama())
    A, B = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    layers = adapt.adapter_layers(m)
    shared = next(iter(layers.values())).method.shared
    assert torch.equal(shared["A"], A) and torch.equal(shared["B"], B)  # the same draws from the same key
    for n, lay in layers.items():
        a, p = lay.adapter, peft_layer(pm, n)
        assert torch.equal(a.vera_A, A[:, :lay.in_features]) and torch.equal(a.vera_B, B[:lay.out_features])
        assert a.vera_A.data_ptr() == shared["A"].data_ptr()  # views: one copy for all the layers
        assert torch.equal(a.lambda_d, p.vera_lambda_d["default"])
        assert torch.equal(a.lambda_b, p.vera_lambda_b["default"])
    assert adapt.count_trainable(m) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert not any("vera_A" in k for k in adapt.api.adapter_state(m))  # not per layer: once, as "_shared.vera_A"


def test_fold_is_the_vera_update_and_unfold_restores():
    m = tiny_llama()
    x = ids()
    adapt.attach(m, "vera", targets="all-linear", r=4)
    perturb(m)
    y = m(x).logits
    W0 = {n: lay.weight_2d().detach().clone() for n, lay in adapt.adapter_layers(m).items()}
    for n, lay in adapt.adapter_layers(m).items():
        a = lay.adapter
        dW = torch.diag(a.lambda_b.double()) @ a.vera_B.double() @ torch.diag(a.lambda_d.double()) @ a.vera_A.double()
        assert (lay.merged_weight().double() - (W0[n].double() + dW)).abs().max() <= 1e-6, n
        xi = torch.randn(6, lay.in_features, dtype=torch.float64)
        ref = F.linear(xi, W0[n].double() + dW)
        assert (lay(xi.float()).detach().double() - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), n
    adapt.fold(m, unload=False)
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.unfold(m)
    for n, lay in adapt.adapter_layers(m).items():
        assert (lay.weight_2d() - W0[n]).abs().max() <= 1e-6, n


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float64, 0.0), (torch.float32, 0.1)])
def test_gradients_and_adamw_steps_match_peft(dtype, dropout):
    base = tiny_llama().to(dtype)
    pm = peft_vera(base, vera_dropout=dropout)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # lambda_b != 0 so that lambda_d gets a gradient
        for n, p in pm.named_parameters():
            if "vera_lambda_b" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    m = copy.deepcopy(base)
    adapt.attach(m, "vera", targets=TARGETS, r=4, dropout=dropout)
    copy_from_peft(pm, m)

    def grads(tol):
        for n, lay in adapt.adapter_layers(m).items():
            p = peft_layer(pm, n)
            for mine, theirs in ((lay.adapter.lambda_b, p.vera_lambda_b["default"]),
                                 (lay.adapter.lambda_d, p.vera_lambda_d["default"])):
                assert mine.grad.abs().max() > 0
                assert (mine.grad - theirs.grad).abs().max() <= 10 * tol * theirs.grad.abs().max(), n

    # the same dropout masks in both: one per layer, in layer order
    tol = adamw_lockstep(pm, m, dtype, grads, seeded_dropout=True)
    for n, lay in adapt.adapter_layers(m).items():
        p = peft_layer(pm, n)
        assert (lay.adapter.lambda_b - p.vera_lambda_b["default"]).abs().max() <= tol, n
        assert (lay.adapter.lambda_d - p.vera_lambda_d["default"]).abs().max() <= tol, n


@pytest.mark.parametrize("save_projection", [True, False])
def test_export_loads_in_peft_with_equal_logits(save_projection, tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, "vera", targets=TARGETS, r=4, save_projection=save_projection)
    perturb(m)
    y = m(x).logits

    def reload(folder):  # a saved weightlab folder loads back (projections regenerated)
        assert torch.allclose(adapt.load(tiny_llama(), folder)(x).logits, y, atol=1e-5)

    conf = check_peft_export(m, base, x, y, tmp_path, reference=peft_vera(base, save_projection=save_projection),
                             after_save=reload)
    assert conf["peft_type"] == "VERA" and conf["r"] == 4 and conf["save_projection"] is save_projection


def test_import_peft_vera_adapter(tmp_path):
    base = tiny_llama()
    pm = peft_vera(base, ["k_proj", "gate_proj"], r=8, projection_prng_key=3, d_initial=0.5)
    randomize(pm)
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    assert not torch.allclose(y, base(x).logits, atol=1e-3)
    pm.save_pretrained(str(tmp_path / "p"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    layers = adapt.adapter_layers(m)
    assert len(layers) == 4 and {lay.method.name for lay in layers.values()} == {"vera"}
    assert next(iter(layers.values())).method.cfg.projection_prng_key == 3
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.export_peft(m, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "again")).eval()
    assert torch.allclose(pm2(input_ids=x).logits, y, atol=1e-5)
    adapt.fold(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5)


def test_import_takes_the_files_projections(tmp_path):
    """A folder whose projections are not the key's (saved by another generator) imports them as written."""
    from safetensors.torch import load_file, save_file

    pm = peft_vera(tiny_llama())
    randomize(pm)
    with torch.no_grad():
        pm.base_model.vera_A["default"].mul_(1.5)
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    pm.save_pretrained(str(tmp_path / "p"))
    assert "base_model.vera_A" in load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.save(m, tmp_path / "wl")  # weightlab's folder keeps them (once), for load and for PEFT export
    assert "_shared.vera_A" in load_file(str(tmp_path / "wl" / "adapter.safetensors"))
    assert torch.allclose(adapt.load(tiny_llama(), tmp_path / "wl")(x).logits, y, atol=1e-5)
    adapt.export_folder_peft(tmp_path / "wl", tmp_path / "peft2")
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft2")).eval()
    assert torch.allclose(pm2(input_ids=x).logits, y, atol=1e-5)
    f = tmp_path / "p" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "vera_A" not in k and "vera_B" not in k}, str(f))
    m2 = adapt.import_peft(tiny_llama(), tmp_path / "p")  # without them: the key's projections
    assert not torch.allclose(m2(x).logits, y, atol=1e-4)


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_hf_conv1d_matches_peft_and_conv2d_is_refused():
    from transformers.pytorch_utils import Conv1D

    from weightlab.errors import ConfigError

    torch.manual_seed(0)
    base = _Net(Conv1D(12, 10))
    x = torch.randn(4, 10)
    pm = peft_vera(base, ["layer"], r=3, fan_in_fan_out=True)
    randomize(pm)
    m = copy.deepcopy(base)
    adapt.attach(m, "vera", targets=["layer"], r=3)
    copy_from_peft(pm, m)
    y = pm(x)
    assert torch.allclose(m(x), y, atol=1e-5)
    (pm(x) ** 2).sum().backward()
    (m(x) ** 2).sum().backward()
    p = pm.base_model.model.layer
    assert torch.allclose(m.layer.adapter.lambda_d.grad, p.vera_lambda_d["default"].grad, atol=1e-5)
    assert torch.allclose(m.layer.adapter.lambda_b.grad, p.vera_lambda_b["default"].grad, atol=1e-5)
    folded = adapt.fold(copy.deepcopy(m))
    assert type(folded.layer) is Conv1D and torch.allclose(folded(x), y, atol=1e-5)
    with pytest.raises(ConfigError, match="does not support"):
        adapt.attach(_Net(nn.Conv2d(3, 6, 3)), "vera", targets=["layer"], r=2)


def test_tune_cli_trains_vera_and_exports_it_to_peft(base, tmp_path):  # noqa: F811
    conf, ref = tune_cli_roundtrip(base, tmp_path, "vera", "--rank", "8")
    assert conf["config"]["r"] == 8
    assert any(lay.adapter.lambda_b.abs().max() > 0 for lay in adapt.adapter_layers(ref).values())
