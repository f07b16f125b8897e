"""model+lora merge inputs: a PEFT LoRA folded into its model as the merge reads it equals PEFT's own fold."""
import json

import pytest
import torch

import weightlab as wl
from weightlab.io.lora_fold import LoraFolded, split_model_lora
from weightlab.merge.api import load_merge_config
from weightlab.merge.engine import run_merge

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from _tiny_llama import tiny_llama
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora-in")
    model = tiny_llama(root / "base")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6}, lora_dropout=0.0,
                     modules_to_save=["lm_head"])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return root, merged


def test_fold_equals_peft_merge_and_unload(base_and_adapter):
    root, want = base_and_adapter
    src = LoraFolded(root / "base", root / "adapter")
    assert sorted(src.names()) == sorted(n for n in want if n in src.names())
    changed = 0
    for n in src.names():
        got = src.get(n)
        assert torch.allclose(got, want[n], atol=1e-6), n
        changed += not torch.equal(got, wl.open_checkpoint(root / "base").get(n))
    assert changed == 2 * 3 + 2  # q, v, down in both layers, the embedding, lm_head (modules_to_save)


def test_mergekit_model_plus_lora_input(base_and_adapter, tmp_path):
    root, want = base_and_adapter
    assert split_model_lora(f"{root / 'base'}+{root / 'adapter'}") == (str(root / "base"), str(root / "adapter"))
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {root / 'base'}+{root / 'adapter'}\n"
                   f"    parameters: {{weight: 1.0}}\n  - model: {root / 'base'}\n    parameters: {{weight: 1.0}}\n")
    job = load_merge_config(cfg)
    assert job.models[0].lora == str(root / "adapter") and job.models[1].lora is None
    out = run_merge(job, tmp_path / "out").output
    got = wl.open_checkpoint(out)
    base = wl.open_checkpoint(root / "base")
    n = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got.get(n), (want[n] + base.get(n)) / 2, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_adapter_that_does_not_fit_is_refused(base_and_adapter, tmp_path):
    from _tiny_llama import tiny_llama

    root, _ = base_and_adapter
    tiny_llama(tmp_path / "wide", hidden=32, inter=64)
    with pytest.raises(wl.ConfigError, match="in the base"):
        LoraFolded(tmp_path / "wide", root / "adapter")
    with pytest.raises(wl.ConfigError, match="not a PEFT adapter folder"):
        LoraFolded(root / "base", root / "base")


def test_dora_adapter_folds_like_peft(tmp_path):
    from _tiny_llama import tiny_llama
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "dora")
    want = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    src = LoraFolded(tmp_path / "base", tmp_path / "dora")
    for n in src.names():
        assert torch.allclose(src.get(n), want[n], atol=1e-6), n
    assert not torch.equal(src.get("model.layers.1.self_attn.o_proj.weight"),
                           wl.open_checkpoint(tmp_path / "base").get("model.layers.1.self_attn.o_proj.weight"))
