"""AdaLoRA: PEFT's ADALORA semantics - init, fold, orthogonal regularizer, budget schedule, lock-step training with
the rank allocator active (masks, E values, losses), PEFT folders both ways (pruned ranks), the tune CLI."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.errors import ConfigError

peft = pytest.importorskip("peft")
from _peft_parity import adamw_lockstep, check_peft_export, tune_cli_roundtrip  # noqa: E402
from test_adapt import ids, perturb, tiny_llama  # noqa: E402
from test_tune_cli import base  # noqa: E402,F401  (the tiny Llama folder with a tokenizer, for the CLI test)

from weightlab.adapt.adalora import budget_schedule, rank_pattern, triplet_scores  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
PARAMS = ("lora_A", "lora_E", "lora_B")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def peft_model(model, targets=TARGETS, task_type="CAUSAL_LM", **kw):
    """PEFT's AdaLoRA on a copy; the CAUSAL_LM wrapper is the one whose loss has the orthogonal regularizer."""
    return peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(target_modules=list(targets),
                                                                         task_type=task_type, **kw))


def peft_params(pm, name):
    lay = pm.base_model.model.get_submodule(name)
    return {k: getattr(lay, k)["default"] for k in PARAMS}


def copy_from_peft(pm, m):
    with torch.no_grad():
        for n, lay in adapt.adapter_layers(m).items():
            for k, v in peft_params(pm, n).items():
                getattr(lay.adapter, k).copy_(v)


def test_defaults_are_peft_init_is_peft_and_output_unchanged():
    from weightlab.registry import get_method

    ref = peft.AdaLoraConfig(total_step=10)
    d = get_method("adapt", "adalora").defaults()
    for ours, theirs in [("init_r", "init_r"), ("target_r", "target_r"), ("tinit", "tinit"), ("tfinal", "tfinal"),
                         ("deltaT", "deltaT"), ("beta1", "beta1"), ("beta2", "beta2"),
                         ("orth_reg_weight", "orth_reg_weight"), ("alpha", "lora_alpha"),
                         ("dropout", "lora_dropout")]:
        assert d[ours] == getattr(ref, theirs), ours
    m = tiny_llama()
    x = ids()
    y0 = m(x).logits
    torch.manual_seed(11)
    pm = peft_model(m, total_step=10)
    torch.manual_seed(11)  # the same global draws in the same order: PEFT's very tensors
    adapt.attach(m, "adalora", targets=TARGETS, total_step=10)
    for n, lay in adapt.adapter_layers(m).items():
        for k, v in peft_params(pm, n).items():
            assert torch.equal(getattr(lay.adapter, k), v), (n, k)
        assert float(lay.adapter.lora_A.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert torch.equal(m(x).logits, y0)  # E = 0
    assert adapt.count_trainable(m) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapt.count_trainable(m) == sum(12 * (lay.in_features + lay.out_features + 1)
                                           for lay in adapt.adapter_layers(m).values())


def test_fold_is_exact_and_equals_peft_merge():
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, "adalora", targets="all-linear", init_r=4, target_r=2, alpha=6.0, total_step=10)
    perturb(m)
    pm = peft_model(base, targets=list(adapt.adapter_layers(m)), init_r=4, target_r=2, lora_alpha=6,
                    total_step=10).eval()
    copy_from_peft(pm, m)
    y = m(x).logits
    assert torch.allclose(pm(input_ids=x).logits, y, atol=1e-5)
    W0 = {n: lay.weight_2d().detach().clone() for n, lay in adapt.adapter_layers(m).items()}
    adapt.fold(m, unload=False)
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    merged = pm.merge_and_unload()
    for n, lay in adapt.adapter_layers(m).items():
        a = lay.adapter
        hand = W0[n] + 6.0 / (4 + 1e-5) * sum(a.lora_E[i, 0] * torch.outer(a.lora_B[:, i], a.lora_A[i])
                                               for i in range(4))
        assert (lay.weight_2d() - hand).abs().max() <= 1e-6 * hand.abs().max(), n
        assert (merged.get_submodule(n).weight - lay.weight_2d()).abs().max() <= 1e-6 * hand.abs().max(), n
    adapt.unfold(m)
    for n, lay in adapt.adapter_layers(m).items():
        assert (lay.weight_2d() - W0[n]).abs().max() <= 1e-6 * W0[n].abs().max(), n
    assert torch.allclose(m(x).logits, y, atol=1e-5)


def test_orthogonal_regularizer_equals_hand_computation():
    m = tiny_llama()
    adapt.attach(m, "adalora", targets=["q_proj", "down_proj"], init_r=3, target_r=1, total_step=10)
    layers = adapt.adapter_layers(m)
    with torch.no_grad():
        for lay in layers.values():
            lay.adapter.lora_A.zero_()
            lay.adapter.lora_A[:, :3].copy_(2 * torch.eye(3))  # A A^T = 4 I: ||3 I||_F = 3 sqrt(3)
            lay.adapter.lora_B.zero_()  # B^T B = 0: ||-I||_F = sqrt(3)
    # orth_reg_weight 0.5 * (sum of the 2L norms) / (2L) with L = 4 layers
    assert float(adapt.regularizers(m).detach()) == pytest.approx(0.5 * (3 * math.sqrt(3) + math.sqrt(3)) / 2, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lay in layers.values():
            for k in ("lora_A", "lora_B"):
                getattr(lay.adapter, k).copy_(torch.randn(getattr(lay.adapter, k).shape, generator=g))
    hand = sum(torch.linalg.matrix_norm(l.adapter.lora_A @ l.adapter.lora_A.T - torch.eye(3))
               + torch.linalg.matrix_norm(l.adapter.lora_B.T @ l.adapter.lora_B - torch.eye(3))
               for l in layers.values()) / (2 * len(layers))
    assert float(adapt.regularizers(m).detach()) == pytest.approx(0.5 * float(hand), rel=1e-6)


def test_budget_schedule_equals_peft():
    from weightlab.adapt.adalora import AdaLoraConfig

    kw = dict(init_r=6, target_r=2, tinit=3, tfinal=4, total_step=20, deltaT=2)
    pm = peft_model(tiny_llama(), **kw)  # 3 targets x 2 layers: initial budget 36, target 12
    ra = pm.base_model.rankallocator
    assert (ra.init_bgt, ra.target_bgt) == (36, 12)
    cfg = AdaLoraConfig(**kw)
    for step in range(0, 24):
        assert budget_schedule(step, 36, 12, cfg, 20) == ra.budget_schedule(step), step
    # by hand: warm-up to tinit, then 12 + 24 (1 - (t - 3)/13)^3, masks on even steps, final budget from step 16
    assert budget_schedule(3, 36, 12, cfg, 20) == (36, False)
    assert budget_schedule(4, 36, 12, cfg, 20) == (int(24 * (12 / 13) ** 3 + 12), True) == (30, True)
    assert budget_schedule(5, 36, 12, cfg, 20) == (26, False)
    assert budget_schedule(16, 36, 12, cfg, 20) == (12, True)
    assert budget_schedule(17, 36, 12, cfg, 20) == (12, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("deltaT", [1, 2])
def test_lockstep_with_allocator_matches_peft(dtype, deltaT):
    total = 8
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=deltaT, total_step=total)
    base = tiny_llama().to(dtype)
    torch.manual_seed(3)
    pm = peft_model(base, **kw)
    for n, p in pm.named_parameters():  # PEFT 0.21 re-wraps ranknum trainable when it casts it (float64, bf16
        if "ranknum" in n:  # bases) and AdamW then moves it; it is the constant init_r (weightlab keeps it so)
            p.requires_grad_(False)
    m = copy.deepcopy(base)
    adapt.attach(m, "adalora", targets=TARGETS, **kw)
    copy_from_peft(pm, m)
    layers = adapt.adapter_layers(m)
    seen, revived = [], []

    def grads(tol):
        for n, lay in layers.items():
            theirs = peft_params(pm, n)
            for k in PARAMS:
                p = getattr(lay.adapter, k)
                assert (p.grad - theirs[k].grad).abs().max() <= 10 * tol * theirs[k].grad.abs().max(), (n, k)

    ra = pm.base_model.rankallocator

    def after_step(step, tol):
        if step < total - 2:  # the smoothed sensitivities, uncertainties and triplet scores are PEFT's
            ra.update_ipt(pm.base_model.model)
            adapt.step_hooks(m, step, total)
            for n, lay in layers.items():
                key = {k: f"{n}.{k}.default" for k in PARAMS}
                for k in PARAMS:
                    for mine, theirs in zip(lay.method.ema[k], (ra.exp_avg_ipt[key[k]], ra.exp_avg_unc[key[k]])):
                        assert (mine - theirs).abs().max() <= 10 * tol * theirs.abs().max(), (step, n, k)
                theirs = ra._combine_ipt(ra._element_score(key["lora_E"]), torch.cat(
                    [ra._element_score(key["lora_A"]).mean(dim=1, keepdim=True),
                     ra._element_score(key["lora_B"]).mean(dim=0).view(-1, 1)], dim=1))
                assert (triplet_scores(lay) - theirs).abs().max() <= 10 * tol * theirs.abs().max(), (step, n)
            # the rest of PEFT's update_and_allocate(step) (its statistics are updated above)
            budget, mask = ra.budget_schedule(step)
            if mask:
                pm.peft_config["default"].rank_pattern = ra.mask_to_budget(pm.base_model.model, budget)
        else:
            pm.base_model.update_and_allocate(step)
            adapt.step_hooks(m, step, total)
        pattern = pm.peft_config["default"].rank_pattern
        for n, lay in layers.items():
            theirs = peft_params(pm, n)
            assert (lay.adapter.lora_E - theirs["lora_E"]).abs().max() <= 10 * tol, (step, n)
            if pattern is not None:
                assert lay.adapter.rank_mask.tolist() == pattern[f"{n}.lora_E.default"], (step, n)
                off = lay.adapter.lora_E[~lay.adapter.rank_mask]
                if step >= total - 2 or step % deltaT == 0:  # masked at this step (tinit = 1, tfinal = 2)
                    assert torch.all(off == 0), (step, n)
                else:  # between two allocations the optimizer may revive a masked triplet, as in PEFT
                    revived.append(bool((off != 0).any()))
        seen.append(sum(int(lay.adapter.rank_mask.sum()) for lay in layers.values()))

    adamw_lockstep(pm, m, dtype, grads, steps=total + 1, regularize=True, after_step=after_step)
    n = len(layers)
    assert seen[0] == 4 * n  # tinit: nothing masked
    assert seen[-1] == 2 * n and min(seen) < 4 * n  # the final budget, target_r per layer on average
    assert len({tuple(lay.adapter.rank_mask.tolist()) for lay in layers.values()}) > 1  # ranks were re-allocated
    assert any(revived) == (deltaT > 1)


def _train(m, total, steps=None, lr=1e-2):
    """A few AdamW steps with the regularizer and the allocator, as PEFT's documented loop."""
    opt = adapt.make_optimizer(m, lr)
    for s in range(1, (steps or total) + 1):
        x = ids(seed=s)
        (m(x, labels=x).loss + adapt.regularizers(m)).backward()
        opt.step()
        adapt.step_hooks(m, s, total)
        opt.zero_grad()


def test_export_with_pruned_ranks_loads_in_peft(tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    kw = dict(init_r=4, target_r=2, total_step=4)
    adapt.attach(m, "adalora", targets=TARGETS, **kw)
    perturb(m)
    _train(m, 4)
    pat = rank_pattern(m)
    assert sum(map(sum, pat.values())) == 2 * len(pat) and any(not all(p) for p in pat.values())
    ref = peft_model(base, **kw)
    ref.peft_config["default"].rank_pattern = {f"{n}.lora_E": p for n, p in pat.items()}

    def saved_mask(folder):  # the weightlab folder keeps the masks
        from safetensors.torch import load_file

        sd = load_file(str(folder / "adapter.safetensors"))
        for n, p in pat.items():
            (key,) = [k for k in sd if k.startswith(n + ".") and k.endswith(".rank_mask")]
            assert sd[key].tolist() == p

    conf = check_peft_export(m, base, x, m(x).logits, tmp_path, reference=ref, after_save=saved_mask)
    assert conf["peft_type"] == "ADALORA" and conf["init_r"] == 4 and conf["total_step"] == 4
    assert conf["rank_pattern"] == {f"{n}.lora_E": p for n, p in pat.items()}
    again = json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == conf["rank_pattern"]


def test_import_peft_trained_adalora_with_pruned_ranks(tmp_path):
    base = tiny_llama()
    total = 4
    torch.manual_seed(2)
    pm = peft_model(base, init_r=4, target_r=2, total_step=total, lora_alpha=4)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for s in range(1, total + 1):
        x = ids(seed=s)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(s)
        opt.zero_grad()
    pm.eval()
    x = ids()
    y = pm(input_ids=x).logits
    pm.save_pretrained(str(tmp_path / "p"))
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] is not None
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    layers = adapt.adapter_layers(m)
    assert {lay.method.name for lay in layers.values()} == {"adalora"} and len(layers) == 6
    for n, lay in layers.items():
        kept = sum(saved["rank_pattern"][f"{n}.lora_E"])
        assert lay.adapter.lora_A.shape[0] == kept and lay.adapter.lora_B.shape[1] == kept
    assert sorted(lay.adapter.lora_A.shape[0] for lay in layers.values()) != [2] * 6  # ranks differ per layer
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.save(m, tmp_path / "wl")  # the pruned shapes survive a weightlab folder
    m2 = adapt.load(tiny_llama(), tmp_path / "wl")
    assert torch.allclose(m2(x).logits, y, atol=1e-5)
    adapt.export_folder_peft(tmp_path / "wl", tmp_path / "p2")
    assert json.loads((tmp_path / "p2" / "adapter_config.json").read_text())["rank_pattern"] == saved["rank_pattern"]
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p2")).eval()
    assert torch.allclose(pm2(input_ids=x).logits, y, atol=1e-5)
    adapt.fold(m)
    assert torch.allclose(m(x).logits, y, atol=1e-5)


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
def test_conv_layers_match_peft(kind, tmp_path):
    from safetensors.torch import load_file
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if kind == "conv2d":
        base, x = _Net(nn.Conv2d(4, 6, 3, padding=1)), torch.randn(2, 4, 8, 8)
    else:
        base, x = _Net(Conv1D(6, 5)), torch.randn(3, 5)
    pm = peft_model(base, ["layer"], task_type=None, init_r=3, target_r=1, total_step=5, lora_alpha=5)
    with torch.no_grad():
        for k, p in peft_params(pm, "layer").items():
            p.copy_(0.3 * torch.randn(p.shape))
    m = copy.deepcopy(base)
    adapt.attach(m, "adalora", targets=["layer"], init_r=3, target_r=1, total_step=5, alpha=5.0)
    copy_from_peft(pm, m)
    y = pm(x)
    assert torch.allclose(m(x), y, atol=1e-5)
    (pm(x) ** 2).sum().backward()
    (m(x) ** 2).sum().backward()
    for k, p in peft_params(pm, "layer").items():
        mine = getattr(m.layer.adapter, k).grad
        assert (mine - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), k
    adapt.export_peft(m, tmp_path / "p")
    fresh = peft_model(base, ["layer"], task_type=None, init_r=3, target_r=1, total_step=5, lora_alpha=5)
    res = peft.set_peft_model_state_dict(fresh, load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert not res.unexpected_keys
    assert torch.allclose(fresh(x), y, atol=1e-5)
    folded = adapt.fold(copy.deepcopy(m))
    assert type(folded.layer) is type(base.layer) and torch.allclose(folded(x), y, atol=1e-5)


def test_bad_configs_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="target_r"):
        adapt.attach(tiny_llama(), "adalora", targets=TARGETS, init_r=4, target_r=6, total_step=10)
    with pytest.raises(ConfigError, match="tinit"):
        adapt.attach(tiny_llama(), "adalora", targets=TARGETS, tinit=5, tfinal=5, total_step=10)
    m = adapt.attach(tiny_llama(), "adalora", targets=TARGETS, tinit=5, tfinal=5)  # total from the loop
    with pytest.raises(ConfigError, match="tinit"):
        adapt.step_hooks(m, 1, 10)
    m = adapt.attach(tiny_llama(), "adalora", targets=TARGETS, init_r=4, target_r=2, total_step=5)
    adapt.export_peft(m, tmp_path / "p")
    conf = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    conf["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, False]}
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="q_proj: rank 4"):
        adapt.import_peft(tiny_llama(), tmp_path / "p")


def test_tune_cli_trains_with_the_allocator_and_exports_to_peft(base, tmp_path):  # noqa: F811
    conf, ref = tune_cli_roundtrip(base, tmp_path, "adalora", "-p", "init_r=4", "-p", "target_r=2")
    assert conf["config"]["total_step"] == 3 and conf["config"]["init_r"] == 4
    pat = rank_pattern(ref)  # step 3 = total_step: the final mask, 2 ranks per layer on average
    assert sum(map(sum, pat.values())) == 2 * len(pat)
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "ADALORA"
    assert exported["rank_pattern"] == {f"{n}.lora_E": p for n, p in pat.items()}
