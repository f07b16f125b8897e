"""Several named adapters on one model (PEFT's add_adapter / set_adapter / delete_adapter), PEFT's
add_weighted_adapter (linear, cat, svd) and rank_pattern / alpha_pattern, against PEFT itself."""
import copy
import json
import math

import pytest
import torch

from weightlab import adapt
from weightlab.errors import ConfigError

peft = pytest.importorskip("peft")
from test_adapt import ids, perturb, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def two_adapters():
    """tiny Llama with "default" (LoRA r=4 on q, v) and "b" (LoHa r=2 on q, k), both moved off their init."""
    m = tiny_llama()
    adapt.attach(m, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8)
    perturb(m)
    adapt.attach(m, "loha", targets=["q_proj", "k_proj"], name="b", r=2, alpha=4)
    adapt.set_active(m, "b")
    perturb(m)
    adapt.set_active(m, "default")
    return m


def test_switching_gives_each_adapters_own_output(tmp_path):
    m = two_adapters()
    x = ids()
    assert adapt.adapter_names(m) == ["default", "b"] and adapt.active_adapters(m) == ["default"]
    y_a = m(x).logits
    adapt.save(m, tmp_path / "a", name="default")
    adapt.save(m, tmp_path / "b", name="b")
    only_a, only_b = adapt.load(tiny_llama(), tmp_path / "a"), adapt.load(tiny_llama(), tmp_path / "b")
    assert adapt.adapter_names(only_b) == ["b"]  # the saved name
    assert torch.equal(y_a, only_a(x).logits)
    adapt.set_active(m, "b")
    assert torch.equal(m(x).logits, only_b(x).logits)
    # only the active adapter trains
    train = {n for n, p in m.named_parameters() if p.requires_grad}
    assert train and all(".adapter_b." in n for n in train)
    assert adapt.count_trainable(m) == adapt.count_trainable(only_b)
    adapt.set_active(m, "default")
    assert torch.equal(m(x).logits, y_a)
    assert all(".adapter." in n for n, p in m.named_parameters() if p.requires_grad)


def test_both_active_equals_peft_sum_of_adapters(tmp_path):
    base = tiny_llama()
    x = ids()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False), adapter_name="p")
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    m = tiny_llama()
    assert adapt.import_peft_all(m, tmp_path / "p") == ["b", "p"]  # sub-folders by name
    for name in ("p", "b"):  # each adapter by name
        pm.set_adapter(name)
        adapt.set_active(m, name)
        assert torch.allclose(m(x).logits, pm(input_ids=x).logits, atol=1e-5)
    pm.base_model.set_adapter(["p", "b"])
    adapt.set_active(m, ["p", "b"])
    y = m(x).logits
    assert torch.allclose(y, pm(input_ids=x).logits, atol=1e-5)
    adapt.set_active(m, "p")
    assert not torch.allclose(y, m(x).logits, atol=1e-3)  # b's term is really there
    adapt.set_active(m, ["p", "b"])
    # folding both at once gives the same function; unfold restores the base exactly
    w0 = m.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    adapt.fold(m, unload=False, name=["p", "b"])
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.unfold(m)
    assert torch.equal(m.model.layers[0].self_attn.q_proj.base_layer.weight, w0)
    assert torch.allclose(m(x).logits, y, atol=1e-6)


def test_delete_restores_and_fold_one_by_name():
    m0 = tiny_llama()
    sd0 = copy.deepcopy(m0.state_dict())
    m = two_adapters()
    x = ids()
    y_a = m(x).logits
    adapt.set_active(m, ["default", "b"])
    y_ab = m(x).logits
    assert not torch.allclose(y_ab, y_a, atol=1e-3)
    mf = copy.deepcopy(m)
    adapt.delete(m, "b")
    assert adapt.adapter_names(m) == ["default"] and adapt.active_adapters(m) == ["default"]
    assert torch.equal(m(x).logits, y_a)
    assert type(m.model.layers[0].self_attn.k_proj).__name__ == "Linear"  # b's own layer is plain again
    adapt.delete(m, "default")
    assert not adapt.adapter_layers(m) and adapt.adapter_names(m) == []
    assert all(torch.equal(v, sd0[k]) for k, v in m.state_dict().items())
    # fold "b" alone: it is baked into the weights, "default" stays attached on top
    adapt.fold(mf, name="b")
    assert adapt.adapter_names(mf) == ["default"]
    assert torch.allclose(mf(x).logits, y_ab, atol=1e-5)


def test_name_errors_and_exclusive_methods():
    m = two_adapters()
    with pytest.raises(ConfigError, match="already has an adapter named 'b'"):
        adapt.attach(m, "lora", targets=["q_proj"], name="b")
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        adapt.set_active(m, "c")
    with pytest.raises(ConfigError, match="not valid"):
        adapt.attach(m, "lora", targets=["q_proj"], name="a.b")
    with pytest.raises(ConfigError, match="residual"):  # PiSSA rewrites the base: it cannot share a layer
        adapt.attach(m, "pissa", targets=["q_proj"], name="p", r=2)
    with pytest.raises(ConfigError, match="say which one"):
        adapt.save(adapt.set_active(m, ["default", "b"]), "/nonexistent/x")


def _peft_pair(cfg_a, cfg_b, tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), cfg_a, adapter_name="p")
    pm.add_adapter("b", cfg_b)
    pm.save_pretrained(str(tmp_path / "p"))
    m = tiny_llama()
    adapt.import_peft_all(m, tmp_path / "p")
    adapt.set_active(m, "p")
    return pm, m


COMBOS = [("linear", {}), ("cat", {}), ("svd", {}), ("svd", dict(svd_rank=3)), ("svd", dict(svd_clamp=0.9))]


@pytest.mark.parametrize("combination,kw", COMBOS)
def test_add_weighted_equals_peft(combination, kw, tmp_path):
    rb = 2 if combination != "linear" else 4
    pm, m = _peft_pair(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                       peft.LoraConfig(r=rb, lora_alpha=16, target_modules=["q_proj", "k_proj"],
                                       init_lora_weights=False), tmp_path)
    x = ids()
    pm.add_weighted_adapter(["p", "b"], [0.7, -0.4], "ab", combination_type=combination, **kw)
    adapt.add_weighted(m, ["p", "b"], [0.7, -0.4], "ab", combination=combination, **kw)
    assert adapt.active_adapters(m) == ["p"]  # added inactive, as in PEFT
    layers = adapt.adapter_layers(m, "ab")
    assert sorted(layers) == sorted(n for n, mod in pm.base_model.model.named_modules()
                                    if hasattr(mod, "lora_A") and "ab" in mod.lora_A)
    for n, lay in layers.items():
        ref = pm.base_model.model.get_submodule(n)
        ad = lay.adapter_module("ab")
        assert ad.lora_A.shape == ref.lora_A["ab"].weight.shape
        assert torch.allclose(ad.lora_A, ref.lora_A["ab"].weight, atol=1e-6)
        assert torch.allclose(ad.lora_B, ref.lora_B["ab"].weight, atol=1e-6)
        with lay.using("ab"):
            assert lay.method.scale(lay) == ref.scaling["ab"] == 1.0
    pm.set_adapter("ab")
    adapt.set_active(m, "ab")
    assert torch.allclose(m(x).logits, pm(input_ids=x).logits, atol=1e-5)


def test_cat_and_full_rank_svd_are_the_weighted_sum_of_updates():
    m = tiny_llama()
    adapt.attach(m, "lora", targets=["q_proj", "v_proj"], r=4, alpha=8)
    adapt.attach(m, "loha", targets=["q_proj"], name="b", r=2, alpha=4)  # svd takes any method: a LoRA comes out
    adapt.set_active(m, ["default", "b"])
    perturb(m)
    adapt.add_weighted(m, ["default", "b"], [0.5, 2.0], "s", combination="svd", svd_rank=32)  # full rank: exact
    with pytest.raises(ConfigError, match="combine with 'svd'"):
        adapt.add_weighted(m, ["default", "b"], [0.5, 2.0], "c", combination="cat")
    lay = m.model.layers[0].self_attn.q_proj
    W = lay.weight_2d().float()
    want = 0.5 * lay.merged_weight(["default"]) + 2.0 * lay.merged_weight(["b"]) - 1.5 * W
    assert torch.allclose(lay.merged_weight(["s"]), want, atol=1e-5)
    adapt.add_weighted(m, ["default"], [-1.0], "neg")  # one adapter: linear, PEFT's rule; sign on A only
    assert torch.allclose(lay.merged_weight(["neg"]) - W, -(lay.merged_weight(["default"]) - W), atol=1e-6)


def test_weighted_errors():
    m = two_adapters()
    adapt.attach(m, "lora", targets=["q_proj"], name="c", r=2)
    with pytest.raises(ConfigError, match="one rank"):
        adapt.add_weighted(m, ["default", "c"], [1, 1], "x", combination="linear")
    with pytest.raises(ConfigError, match="one finite weight"):
        adapt.add_weighted(m, ["default", "c"], [1], "x")
    with pytest.raises(ConfigError, match="not one of"):
        adapt.add_weighted(m, ["default", "c"], [1, 1], "x", combination="ties")
    with pytest.raises(ConfigError, match="already has an adapter named 'b'"):
        adapt.add_weighted(m, ["default", "c"], [1, 1], "b", combination="cat")


def test_rslora_deviation_from_peft(tmp_path):
    """PEFT keeps use_rslora on the combined adapter (scale R/sqrt(R)); weightlab writes scale 1."""
    cfg = dict(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False)
    pm, m = _peft_pair(peft.LoraConfig(target_modules=["q_proj"], **cfg),
                       peft.LoraConfig(target_modules=["q_proj"], **cfg), tmp_path)
    pm.add_weighted_adapter(["p", "b"], [0.7, 0.3], "ab", combination_type="cat")
    adapt.add_weighted(m, ["p", "b"], [0.7, 0.3], "ab", combination="cat")
    n = "model.layers.0.self_attn.q_proj"
    ref, lay = pm.base_model.model.get_submodule(n), m.get_submodule(n)
    assert ref.scaling["ab"] == pytest.approx(math.sqrt(8))
    peft_dw = ref.get_delta_weight("ab")
    ours = lay.merged_weight(["ab"]) - lay.weight_2d()
    want = sum(w * ref.get_delta_weight(a) for a, w in (("p", 0.7), ("b", 0.3)))
    assert torch.allclose(ours, want, atol=1e-6)
    assert torch.allclose(peft_dw, math.sqrt(8) * want, atol=1e-5)


def test_ia3_linear_equals_peft(tmp_path):
    base = tiny_llama()
    cfg = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg), adapter_name="p")
    pm.add_adapter("b", peft.IA3Config(**cfg))
    pm.save_pretrained(str(tmp_path / "p"))
    m = tiny_llama()
    adapt.import_peft_all(m, tmp_path / "p")
    pm.add_weighted_adapter(["p", "b"], [0.6, 0.5], "ab")
    adapt.add_weighted(m, ["p", "b"], [0.6, 0.5], "ab", combination="linear")
    with pytest.raises(ConfigError, match="'linear' only"):
        adapt.add_weighted(m, ["p", "b"], [0.6, 0.5], "x", combination="svd")
    pm.set_adapter("ab")
    adapt.set_active(m, "ab")
    x = ids()
    assert torch.allclose(m(x).logits, pm(input_ids=x).logits, atol=1e-5)


def test_rank_alpha_patterns_shapes_scales_and_peft(tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    adapt.attach(m, "lora", targets=["q_proj", "v_proj", "up_proj"], r=4, alpha=8,
                 rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6}, alpha_pattern={"up_proj": 3})
    got = {n: (lay.adapter.lora_A.shape[0], lay.method.scale(lay)) for n, lay in adapt.adapter_layers(m).items()}
    assert got["model.layers.0.self_attn.q_proj"] == (4, 2.0)
    assert got["model.layers.1.self_attn.v_proj"] == (2, 4.0)
    assert got["model.layers.0.mlp.up_proj"] == (4, 0.75)
    assert got["model.layers.1.mlp.up_proj"] == (6, 0.5)
    perturb(m)
    x = ids()
    y = m(x).logits
    adapt.export_peft(m, tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["rank_pattern"] == {"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6}
    assert conf["alpha_pattern"] == {"up_proj": 3}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert torch.allclose(pm(input_ids=x).logits, y, atol=1e-5)
    # weightlab folder round trip keeps the patterns; and its PEFT export too (the CLI path)
    adapt.save(m, tmp_path / "wl")
    assert torch.allclose(adapt.load(tiny_llama(), tmp_path / "wl")(x).logits, y, atol=1e-6)
    adapt.export_folder_peft(tmp_path / "wl", tmp_path / "peft2")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft2")).eval()
    assert torch.allclose(pm2(input_ids=x).logits, y, atol=1e-5)
    with pytest.raises(ConfigError, match="matches none"):
        adapt.attach(tiny_llama(), "lora", targets=["q_proj"], rank_pattern={"o_proj": 2})
    with pytest.raises(ConfigError, match="needs a method with 'r'"):
        adapt.attach(tiny_llama(), "ia3", targets=["k_proj"], rank_pattern={"k_proj": 2})


def test_peft_patterns_import(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False,
                          rank_pattern={"k_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 32})
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(tmp_path / "p"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p", name="imp")
    lay = m.model.layers[1].self_attn
    assert lay.k_proj.adapter_module("imp").lora_A.shape[0] == 2
    with lay.q_proj.using("imp"):
        assert lay.q_proj.method.scale(lay.q_proj) == 8.0
    x = ids()
    assert torch.allclose(m(x).logits, pm(input_ids=x).logits, atol=1e-5)


def test_loha_patterns_round_trip_through_peft(tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    adapt.attach(m, "loha", targets=["q_proj", "v_proj"], r=4, alpha=8, rank_pattern={"v_proj": 2})
    perturb(m)
    x = ids()
    y = m(x).logits
    adapt.export_peft(m, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["rank_pattern"] == {"v_proj": 2}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    assert torch.allclose(pm(input_ids=x).logits, y, atol=1e-5)
    back = adapt.import_peft(tiny_llama(), tmp_path / "p")
    assert torch.allclose(back(x).logits, y, atol=1e-5)


def test_cli_combine_equals_peft(tmp_path):
    from weightlab.cli import main

    pm, _ = _peft_pair(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                       peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path)
    pm.add_weighted_adapter(["p", "b"], [0.7, 0.3], "ab", combination_type="svd")
    pm.set_adapter("ab")
    x = ids()
    want = pm(input_ids=x).logits
    args = ["adapter", "combine", str(tmp_path / "p" / "p"), str(tmp_path / "p" / "b"), "--weights", "0.7,0.3",
            "--combination", "svd", "-o", str(tmp_path / "ab")]
    assert main(args) == 0
    conf = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert conf["r"] == conf["lora_alpha"] == 4
    got = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ab")).eval()
    assert torch.allclose(got(input_ids=x).logits, want, atol=1e-5)
    assert main(args) == 1  # exists
    assert main(args[:4] + ["--weights", "1", "-o", str(tmp_path / "z")]) == 1  # one weight for two adapters
    # weightlab folders in and out, cat: exact
    m = tiny_llama()
    adapt.import_peft_all(m, tmp_path / "p")
    adapt.save(m, tmp_path / "wa", name="p")
    adapt.save(m, tmp_path / "wb", name="b")
    assert main(["adapter", "combine", str(tmp_path / "wa"), str(tmp_path / "wb"), "--weights", "0.7,0.3", "-c", "cat",
                 "-o", str(tmp_path / "wcat")]) == 0
    adapt.add_weighted(m, ["p", "b"], [0.7, 0.3], "cat", combination="cat")
    adapt.set_active(m, "cat")
    assert torch.allclose(adapt.load(tiny_llama(), tmp_path / "wcat")(x).logits, m(x).logits, atol=1e-6)
