"""PEFT round trip: weightlab adapters exported as PEFT folders load in peft with equal outputs, and back."""
import copy

import pytest
import torch

from weightlab import adapt

peft = pytest.importorskip("peft")
from test_adapt import ids, perturb, tiny_llama  # noqa: E402

CASES = [("lora", dict(r=4, alpha=8), None), ("lora", dict(r=4, alpha=8, rslora=True), None),
         ("pissa", dict(r=4, alpha=4), None), ("sorsa", dict(r=4), None), ("bone", dict(r=4), None),
         ("bat", dict(r=4), 32), ("gradnormlorp", dict(r=4), 32), ("dora", dict(r=4, alpha=8), None),
         ("ia3", dict(), None), ("vera", dict(r=4), None), ("loha", dict(r=4, alpha=8), None),
         ("lokr", dict(r=4, alpha=8), None)]


@pytest.mark.parametrize("method,cfg,svd_rank", CASES)
def test_export_loads_in_peft_with_equal_outputs(method, cfg, svd_rank, tmp_path):
    base = tiny_llama()
    m = copy.deepcopy(base)
    x = ids()
    adapt.attach(m, method, targets=["q_proj", "v_proj", "up_proj"], **cfg)
    perturb(m)
    y = m(x).logits
    adapt.export_peft(m, tmp_path / "peft", svd_rank=svd_rank)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert torch.allclose(pm(input_ids=x).logits, y, atol=1e-4)
    # and from a saved weightlab folder (the CLI path)
    adapt.save(m, tmp_path / "wl")
    if svd_rank is None:
        adapt.export_folder_peft(tmp_path / "wl", tmp_path / "peft2")
        pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft2")).eval()
        assert torch.allclose(pm2(input_ids=x).logits, y, atol=1e-4)


def test_bat_needs_svd_rank(tmp_path):
    m = tiny_llama()
    adapt.attach(m, "bat", targets=["q_proj"], r=4)
    with pytest.raises(Exception, match="SVD rank"):
        adapt.export_peft(m, tmp_path / "p")


def test_import_peft_lora(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "gate_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    x = ids()
    y = pm(input_ids=x).logits
    pm.save_pretrained(str(tmp_path / "p"))
    m = adapt.import_peft(tiny_llama(), tmp_path / "p")
    assert len(adapt.adapter_layers(m)) == 4
    assert torch.allclose(m(x).logits, y, atol=1e-5)
    adapt.fold(m)
    assert torch.allclose(m(x).logits, y, atol=1e-4)
