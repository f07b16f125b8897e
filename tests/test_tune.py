"""The fine-tuning loop with the data family's reweighters and robust losses, resume, and accelerate."""
import math

import pytest
import torch

from weightlab.adapt.api import adapter_state
from weightlab.engine.sample_loss import LossWeighting, sequence_losses
from weightlab.adapt.training import PairData, TextData, tune
from weightlab.errors import ConfigError
from weightlab.tensor.reweight import ldr_kl

transformers = pytest.importorskip("transformers")
V = 64


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest.py)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def text_data(seqlen=12):
    g = torch.Generator().manual_seed(5)
    # a learnable stream: mostly "next token = previous + 1", so the adapters have something to fit
    ids = torch.cumsum(torch.randint(1, 3, (3000,), generator=g), 0) % V
    return TextData(ids[:2600], seqlen), TextData(ids[2600:], seqlen)


def pair_data():
    g = torch.Generator().manual_seed(6)
    ex = []
    for k in range(20):
        p = torch.randint(0, V, (3 + k % 4,), generator=g).tolist()
        r = [(t + 1) % V for t in p][: 2 + k % 5]
        ex.append((p, r))
    return PairData(ex[:16], 10, 0), PairData(ex[16:], 10, 0)


def per_sequence_losses_by_loop(model, b):
    """Each row's mean label-token loss from transformers' own loss, one row at a time."""
    out = []
    for i in range(b["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in b.items() if k != "sample_ids"}
        out.append(float(model(**row).loss.detach()))
    return torch.tensor(out, dtype=torch.float64)


def hand_weights(L, counts, strategy, r):
    L = L.double()
    h = (2 * L - (L.max() + L.min())) / max(float(L.max() - L.min()), 1e-6)
    f = {"linupper": torch.clamp(h + 1, max=1.0), "quadratic": 1 - h * h, "extremes": h.abs()}[strategy]
    w = torch.exp(f / r) / torch.exp(f / r).sum()
    w = w * counts.double()
    return w / w.sum()


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
def test_loss_reweight_equals_hand_weighting_of_per_sample_losses(strategy):
    model = tiny_llama()
    tr, _ = pair_data()  # sequences with different numbers of label tokens
    b = tr.batch(6, torch.Generator().manual_seed(1))
    counts = (b["labels"][:, 1:] != -100).sum(1)
    assert len(set(counts.tolist())) > 1
    L = per_sequence_losses_by_loop(model, b)
    w = hand_weights(L, counts, strategy, 0.4)
    lw = LossWeighting(strategy, {"burn_in": 0})
    assert lw.name == "loss-reweight" and lw.params["strategy"] == strategy
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = lw(logits, b["labels"])
    assert math.isclose(float(loss.detach()), float((w * L).sum()), rel_tol=1e-5)
    assert torch.allclose(lw.last_weights.double(), w, atol=1e-6)
    # the weights are not uniform here, so the test can tell a weighting from the plain mean
    assert abs(float(loss) - float(model(**{k: v for k, v in b.items() if k != "sample_ids"}).loss)) > 1e-4


def test_dro_equals_softmax_of_losses():
    model = tiny_llama()
    tr, _ = text_data()
    b = tr.batch(5, torch.Generator().manual_seed(2))
    L = per_sequence_losses_by_loop(model, b)
    lw = LossWeighting("dro", {"temperature": 0.05})
    loss = lw(model(input_ids=b["input_ids"]).logits, b["labels"])
    w = torch.softmax(L / 0.05, 0)
    assert math.isclose(float(loss.detach()), float((w * L).sum()), rel_tol=1e-5)
    assert float(loss) > float(L.mean()) + 1e-4  # DRO up-weights the hard sequences


@pytest.mark.parametrize("name,params", [("linupper", {"burn_in": 0, "temperature": 1e9}),
                                         ("extremes", {"burn_in": 0, "temperature": 1e9}),
                                         ("quadratic", {"burn_in": 5}), ("dro", {"temperature": 1e9})])
def test_uniform_limit_is_the_plain_loss(name, params):
    model = tiny_llama()
    tr, _ = pair_data()
    b = tr.batch(6, torch.Generator().manual_seed(3))
    plain = model(**{k: v for k, v in b.items() if k != "sample_ids"})
    lw = LossWeighting(name, params)
    loss = lw(plain.logits, b["labels"])
    if name == "dro":  # no token counts in DRO: the uniform limit is the mean of the sequence means
        L, _ = sequence_losses(plain.logits, b["labels"])
        assert math.isclose(float(loss), float(L.mean()), rel_tol=1e-6)
    else:  # token counts make uniform weights the token-weighted mean, i.e. transformers' loss
        assert math.isclose(float(loss), float(plain.loss), rel_tol=1e-6)


def test_ldr_losses_per_token_and_sample_ids():
    model = tiny_llama()
    tr, _ = pair_data()
    b = tr.batch(4, torch.Generator().manual_seed(4))
    # sample ids: one per token of a pair, stable across draws, distinct within the data
    for k in range(4):
        n = int(b["attention_mask"][k].sum())
        assert torch.equal(b["sample_ids"][k, :n] - b["sample_ids"][k, 0], torch.arange(n))
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lw = LossWeighting("ldr-kl")
    mask = b["labels"][:, 1:] != -100
    ref = ldr_kl(logits[:, :-1][mask], b["labels"][:, 1:][mask], 10.0, 0.1, "softplus").mean()
    assert math.isclose(float(lw(logits, b["labels"])), float(ref), rel_tol=1e-6)
    al = LossWeighting("aldr-kl", num_samples=tr.num_samples)
    al(logits, b["labels"], b["sample_ids"])
    lam = al.fn.lambdas
    touched = b["sample_ids"][:, 1:][mask]
    assert (lam[touched] < 10.0).all() and int((lam < 10.0).sum()) == touched.unique().numel()
    with pytest.raises(ConfigError, match="sample ids"):
        LossWeighting("aldr-kl")
    with pytest.raises(ConfigError, match="does not weight"):
        LossWeighting("el2n")
    tx, _ = text_data()
    bt = tx.batch(3, torch.Generator().manual_seed(0))
    assert torch.equal(tx.ids[bt["sample_ids"]], bt["input_ids"])


@pytest.mark.parametrize("name,params", [("linupper", {"burn_in": 1}), ("quadratic", {"burn_in": 1}),
                                         ("extremes", {"burn_in": 1}), ("dro", {}), ("ldr-kl", {}),
                                         ("aldr-kl", {})])
def test_tune_with_each_reweighter(name, params):
    model = tiny_llama()
    tr, ho = text_data()
    res = tune(model, None, "lora", rank=4, steps=6, lr=1e-2, batch_size=4, train_data=tr, heldout_data=ho,
               eval_every=3, loss_weighting=name, loss_weighting_config=params, progress=False)
    assert res["loss_weighting"]["name"] in ("loss-reweight", "dro", "ldr-kl", "aldr-kl")
    assert all(math.isfinite(h["heldout"]) for h in res["history"])
    if name not in ("ldr-kl", "aldr-kl"):  # the robust LDR losses fit this text far more slowly than CE
        assert res["heldout_after"] < res["heldout_before"]


def test_uniform_reweighting_trains_like_the_plain_loop():
    tr, ho = text_data()
    kw = dict(rank=4, steps=5, lr=1e-2, batch_size=4, train_data=tr, heldout_data=ho, progress=False)
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama()
    tune(a, None, "lora", **kw)
    tune(b, None, "lora", loss_weighting="linupper", loss_weighting_config={"temperature": 1e9, "burn_in": 0}, **kw)
    tune(c, None, "lora", loss_weighting="linupper", loss_weighting_config={"burn_in": 0}, **kw)
    sa, sb, sc = adapter_state(a), adapter_state(b), adapter_state(c)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    assert max(float((sa[k] - sc[k]).abs().max()) for k in sa) > 1e-3


class Stop(Exception):
    pass


@pytest.mark.parametrize("method,weighting", [("lora", None), ("sorsa", "linupper")])
def test_resume_equals_uninterrupted(tmp_path, method, weighting):
    tr, ho = text_data()
    kw = dict(rank=4, steps=6, lr=1e-2, batch_size=4, train_data=tr, heldout_data=ho, eval_every=2, save_every=3,
              progress=False, merged=False, loss_weighting=weighting,
              loss_weighting_config={"burn_in": 2} if weighting else None)
    full = tiny_llama()
    ref = tune(full, None, method, out=tmp_path / "a", **kw)

    def stop_at_4(step, loss):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        tune(tiny_llama(), None, method, out=tmp_path / "b", on_eval=stop_at_4, **kw)
    assert (tmp_path / "b" / "checkpoint" / "trainer.pt").is_file()
    resumed = tiny_llama()
    res = tune(resumed, None, method, out=tmp_path / "b", **kw)
    assert res["resumed_from"] == 3 and not (tmp_path / "b" / "checkpoint").exists()
    sa, sb = adapter_state(full), adapter_state(resumed)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert [h["step"] for h in res["history"]] == [h["step"] for h in ref["history"]] == [0, 2, 4, 6]
    assert math.isclose(res["heldout_after"], ref["heldout_after"], rel_tol=1e-6)


def test_accelerator_single_process_matches_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    tr, ho = text_data()
    kw = dict(rank=4, steps=4, lr=1e-2, batch_size=4, train_data=tr, heldout_data=ho, eval_every=2, progress=False)
    a, b = tiny_llama(), tiny_llama()
    ra = tune(a, None, "lora", accelerator=False, **kw)
    rb = tune(b, None, "lora", accelerator=accelerate.Accelerator(cpu=True), loss_weighting=None, **kw)
    assert rb["processes"] == 1
    assert [h["heldout"] for h in ra["history"]] == pytest.approx([h["heldout"] for h in rb["history"]], rel=1e-6)
    sa, sb = adapter_state(a), adapter_state(b)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
