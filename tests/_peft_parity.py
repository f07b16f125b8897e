"""The checks every PEFT-parity adapter test runs (DoRA, IA3, VeRA, LoHa, LoKr): lock-step AdamW training
against PEFT, a PEFT export loaded back by PEFT, and the `weightlab tune` CLI round trip."""
import copy
import json

import torch

from weightlab import adapt

from test_adapt import ids, tiny_llama  # noqa: E402


def _same(a, b):
    return torch.allclose(a, b, atol=1e-5)


def adamw_lockstep(pm, m, dtype, on_first_grads, steps: int = 3, lr: float = 1e-2, seeded_dropout: bool = False,
                   regularize: bool = False, after_step=None):
    """Train the PEFT model ``pm`` and the weightlab model ``m`` side by side (AdamW, same batches): the
    losses agree every step; ``on_first_grads(tol)`` compares the gradients after the first backward.
    ``seeded_dropout``: the same torch seed before each forward, so dropout draws the same masks.
    ``regularize``: weightlab's loss gets ``adapt.regularizers(m)`` as PEFT's AdaLoRA forward adds its own
    (in place, so in the loss's dtype: float32 from HF even for a float64 model, whose loss then agrees to
    float32 rounding only: the regularizers' sums differ in order at 1e-16, and a logit may round the other way).
    ``after_step(step, tol)``: called after both optimizer steps, before the gradients are cleared (step 1-based).
    Returns the tolerance used (1e-5 in fp32, 1e-10 in fp64)."""
    pm.train()
    m.train()
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    opt_w = adapt.make_optimizer(m, lr)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for step in range(steps):
        x = ids(seed=step)
        if seeded_dropout:
            torch.manual_seed(100 + step)
        lp = pm(input_ids=x, labels=x).loss
        if seeded_dropout:
            torch.manual_seed(100 + step)
        lw = m(x, labels=x).loss
        ltol = tol
        if regularize:
            lw = (lw + adapt.regularizers(m)).to(lw.dtype)
            ltol = max(tol, 4 * torch.finfo(lw.dtype).eps)
        assert abs(float(lp) - float(lw)) <= ltol * max(1.0, abs(float(lp)))
        lp.backward()
        lw.backward()
        if step == 0:
            on_first_grads(tol)
        opt_p.step()
        opt_w.step()
        if after_step is not None:
            after_step(step + 1, tol)
        opt_p.zero_grad()
        opt_w.zero_grad()
    return tol


def check_peft_export(m, base, x, y, tmp_path, reference=None, same=_same, after_save=None) -> dict:
    """``m`` (adapters attached) exported as a PEFT folder: PEFT's keys and shapes (those ``reference``, a
    PeftModel, saves), PEFT loads it with logits ``y`` on ``x``, PEFT's merge equals weightlab's fold, and
    the same from a saved weightlab folder (the CLI path; ``after_save(folder)`` may check it first).
    Returns the written adapter_config.json."""
    import peft
    from safetensors.torch import load_file

    adapt.export_peft(m, tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if reference is not None:
        sd = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        reference.save_pretrained(str(tmp_path / "ref"))
        ref_sd = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert same(pm(input_ids=x).logits, y)
    merged = pm.merge_and_unload()
    folded = adapt.fold(copy.deepcopy(m))
    for n in adapt.adapter_layers(m):
        w_p, w_w = merged.get_submodule(n).weight, folded.get_submodule(n).weight
        assert (w_p - w_w).abs().max() <= 1e-6 * w_p.abs().max(), n
    adapt.save(m, tmp_path / "wl")
    if after_save is not None:
        after_save(tmp_path / "wl")
    adapt.export_folder_peft(tmp_path / "wl", tmp_path / "peft2")
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft2")).eval()
    assert same(pm2(input_ids=x).logits, y)
    return conf


def tune_cli_roundtrip(base, tmp_path, method: str, *extra: str):
    """`weightlab tune -m METHOD` on the tiny Llama folder, then: its merged model equals the base with the
    adapter loaded, and `weightlab adapter export` gives a folder PEFT loads with the same logits.
    Returns (the adapter's config, the base with the adapter loaded)."""
    import peft
    from transformers import AutoModelForCausalLM

    from weightlab.cli import main
    from weightlab.io.hf import load_causal_lm

    out = tmp_path / "t"
    assert main(["tune", str(base / "model"), "--data", str(base / "text.txt"), "-m", method, "--steps", "3",
                 "--seqlen", "16", "--batch-size", "2", "--lr", "1e-2", *extra, "-o", str(out)]) == 0
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["method"] == method
    ref, tok = load_causal_lm(base / "model")
    adapt.load(ref, out / "adapter")
    x = tok("the cat sat on a mat and then it ran.", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        y = ref(x).logits
        assert torch.allclose(merged(x).logits, y, atol=1e-5)
    assert main(["adapter", "export", str(out / "adapter"), "-o", str(tmp_path / "peft")]) == 0
    pm = peft.PeftModel.from_pretrained(load_causal_lm(base / "model")[0], str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=x).logits, y, atol=1e-5)
    return conf, ref
