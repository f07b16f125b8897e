"""Greedy/learned soups, Robust Weight Signatures and Weight Aligning (method notes M1, M9, M11)."""
import math
import subprocess
import sys

import pytest
import torch

import weightlab as wl
from weightlab.merge import signatures as rws
from weightlab.merge.soup import GreedySoupConfig, greedy_soup, learned_soup, uniform_soup
from weightlab.merge.weight_align import weight_align


def _ingredients(n=4):
    return [{"w": torch.full((3,), float(i)), "n": torch.tensor(i)} for i in range(n)]


def test_greedy_soup_mocked_scorer_accepts_exactly_the_right_set():
    values = [1.0, 2.0, 4.0, 8.0]
    ings = [{"w": torch.full((3,), v), "n": torch.tensor(i)} for i, v in enumerate(values)]
    # own scores -> visiting order 1, 3, 2, 0; then the candidate soups (uniform means):
    table = {1.0: .5, 2.0: .9, 4.0: .7, 8.0: .8,
             5.0: .95,  # mean(2, 8): better -> accepted
             14 / 3: .95,  # mean(2, 8, 4): equal -> rejected (strictly better is required)
             11 / 3: .96}  # mean(2, 8, 1): better -> accepted

    def scorer(sd):
        v = float(sd["w"][0])
        return next(s for key, s in table.items() if abs(key - v) < 1e-6)

    res = greedy_soup(ings, scorer)
    assert res.scores == [.5, .9, .7, .8]
    assert res.accepted == [1, 3, 0]
    assert [h["accepted"] for h in res.history] == [True, True, False, True]
    assert torch.allclose(res.state_dict["w"], torch.full((3,), 11 / 3))
    assert int(res.state_dict["n"]) == 1 and res.soup_score == .96  # buffers from the best ingredient


def test_greedy_soup_rejects_all_when_nothing_improves():
    res = greedy_soup(_ingredients(3), lambda sd: -float(sd["w"][0]) if sd["w"][0] % 1 == 0 else -100.0)
    assert res.accepted == [0] and torch.equal(res.state_dict["w"], torch.zeros(3))
    res = greedy_soup(_ingredients(3), lambda sd: 1.0, GreedySoupConfig(sort=False))
    assert res.accepted == [0]  # equal scores are never accepted


def test_uniform_soup_is_mean():
    ings = _ingredients(4)
    assert torch.allclose(uniform_soup(ings)["w"], torch.full((3,), 1.5))


def test_learned_soup_finds_the_useful_ingredient():
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    good = torch.nn.Linear(5, 1)
    y = good(x).detach()
    bad = {k: torch.randn_like(v) for k, v in good.state_dict().items()}
    model = torch.nn.Linear(5, 1)
    soup, w = learned_soup([bad, good.state_dict()], model,
                           lambda m: torch.nn.functional.mse_loss(m(x), y), steps=200, lr=0.1)
    assert bool((w[:, 1] > 0.9).all())
    assert torch.allclose(soup["weight"], good.weight, atol=0.15)


def _sd(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"conv1.weight": torch.randn(4, 1, 3, 3, generator=g) * scale, "conv1.bias": torch.randn(4, generator=g) * scale,
            "conv2.weight": torch.randn(4, 4, 3, 3, generator=g) * scale, "conv2.bias": torch.randn(4, generator=g) * scale,
            "fc.weight": torch.randn(10, 4, generator=g) * scale, "fc.bias": torch.randn(10, generator=g) * scale,
            "bn.num_batches_tracked": torch.tensor(5)}


def test_signature_is_orthogonal_to_clean_direction_and_shallow_only():
    base, clean, robust = _sd(0), _sd(1), _sd(2)
    sig = rws.extract(base, clean, robust, layers=2)
    assert set(sig) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    for layer in ("conv1", "conv2"):
        a = torch.cat([(clean[f"{layer}.{p}"] - base[f"{layer}.{p}"]).reshape(-1) for p in ("weight", "bias")]).double()
        r = torch.cat([sig[f"{layer}.{p}"].reshape(-1) for p in ("weight", "bias")]).double()
        assert abs(float(torch.dot(r, a))) < 1e-5


def test_signature_apply_remove_compose_and_scale():
    base, clean, robust, robust2 = _sd(0), _sd(1), _sd(2), _sd(3)
    s1 = rws.extract(base, clean, robust, layers=2)
    s2 = rws.extract(base, clean, robust2, layers=2)
    c64 = {k: v.double() if v.is_floating_point() else v for k, v in clean.items()}
    patched = rws.apply(c64, [s1], 0.7)
    back = rws.remove(patched, [s1], 0.7)
    # exact up to float64 rounding (bit-exact removal is impossible in general once a sum is rounded)
    assert all(torch.allclose(back[k].double(), c64[k].double(), atol=1e-12, rtol=0) for k in c64)
    p32 = rws.remove(rws.apply(clean, [s1], 1.0), [s1], 1.0)
    for k in clean:  # float32 storage: within one rounding of the patched value
        if clean[k].is_floating_point():
            assert torch.allclose(p32[k], clean[k], atol=1e-6, rtol=0)
    lin = rws.apply(c64, [s1], 2.0)
    assert torch.allclose(lin["conv1.weight"] - c64["conv1.weight"], 2 * s1["conv1.weight"].double(), atol=1e-6)
    both = rws.apply(c64, [s1, s2], 1.0)  # one alpha over C=2 signatures -> each at 1/2
    expect = c64["conv2.weight"] + 0.5 * s1["conv2.weight"].double() + 0.5 * s2["conv2.weight"].double()
    assert torch.allclose(both["conv2.weight"], expect, atol=1e-12)
    assert torch.equal(both["fc.weight"], c64["fc.weight"])  # deep layers untouched


@pytest.mark.parametrize("levels", [16, 256])
def test_signature_quantization_error_bound(tmp_path, levels):
    sig = rws.extract(_sd(0), _sd(1), _sd(2), layers=2)
    path = rws.save(sig, tmp_path / "s.safetensors", levels=levels)
    back = rws.load(path)
    for k, v in sig.items():
        assert float((back[k] - v).abs().max()) <= rws.quant_error_bound(v, levels) * (1 + 1e-5) + 1e-7
    assert wl.open_checkpoint(path).info("conv1.weight").dtype == torch.uint8
    logq = rws.load(rws.save(sig, tmp_path / "l.safetensors", levels=256, mode="log"))
    for k, v in sig.items():  # log quantization keeps signs and relative error small
        nz = v != 0
        assert torch.equal(torch.sign(logq[k][nz]), torch.sign(v[nz]))


def test_signature_cli_roundtrip(tmp_path):
    paths = {n: wl.save_state_dict(_sd(i), tmp_path / n) for i, n in enumerate(("base", "clean", "robust"))}
    run = lambda *a: subprocess.run([sys.executable, "-m", "weightlab", "signature", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    r = run("extract", "--base", paths["base"], "--clean", paths["clean"], "--robust", paths["robust"],
            "--layers", "2", "-o", tmp_path / "sig.safetensors")
    assert r.returncode == 0, r.stderr
    assert run("apply", paths["clean"], tmp_path / "sig.safetensors", "--alpha", "0.5", "-o", tmp_path / "p").returncode == 0
    assert run("remove", tmp_path / "p", tmp_path / "sig.safetensors", "--alpha", "0.5", "-o", tmp_path / "r").returncode == 0
    clean, restored = wl.open_checkpoint(paths["clean"]), wl.open_checkpoint(tmp_path / "r")
    for n in clean.names():
        assert torch.allclose(restored.get(n).float(), clean.get(n).float(), atol=1e-6)
    bad = run("apply", paths["clean"], paths["base"], "-o", tmp_path / "x")
    assert bad.returncode == 1 and "not a weightlab signature" in bad.stderr


def test_weight_align_hand_computed():
    w = torch.tensor([[2.0, 0], [0, 2], [1, 0], [0, 3]])  # old norms {2,2}, new {1,3} -> gamma 1
    out, gamma = weight_align(w, 2)
    assert gamma == pytest.approx(1.0) and torch.allclose(out, w)
    w = torch.tensor([[2.0, 0], [0, 4], [1, 0], [0, 1]])  # old {2,4}, new {1,1} -> gamma 3
    out, gamma = weight_align(w, 2)
    assert gamma == pytest.approx(3.0)
    assert torch.allclose(out[2:], 3 * w[2:]) and torch.equal(out[:2], w[:2])
    assert float(out[2:].norm(dim=1).mean()) == pytest.approx(float(w[:2].norm(dim=1).mean()))
    clipped, _ = weight_align(torch.tensor([[1.0, -1], [-2, 2]]), 1, clip_nonnegative=True)
    assert bool((clipped >= 0).all())
    with pytest.raises(wl.ConfigError):
        weight_align(w, 4)


def test_weight_align_as_recipe_step(tmp_path):
    src = wl.save_state_dict({"fc.weight": torch.tensor([[2.0, 0], [0, 4], [1, 0], [0, 1]]), "fc.bias": torch.ones(4)},
                             tmp_path / "m")
    (tmp_path / "r.yaml").write_text(f"""model: {src}
output: {tmp_path / 'out'}
steps: [{{family: merge, method: weight-align, params: {{head: fc.weight, old_classes: 2}}}}]
""")
    wl.run_recipe(wl.load_recipe(tmp_path / "r.yaml"))
    out = wl.open_checkpoint(tmp_path / "out")
    assert torch.allclose(out.get("fc.weight")[2:], torch.tensor([[3.0, 0], [0, 3]]))
    assert torch.equal(out.get("fc.bias"), torch.ones(4))


def test_lm_scorer_is_minus_log_perplexity():
    transformers = pytest.importorskip("transformers")
    from weightlab.engine.evaluate import perplexity
    from weightlab.merge.scorers import lm_scorer

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return {"input_ids": torch.tensor([[ord(c) % 64 for c in text]])}

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    a, b = transformers.LlamaForCausalLM(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()
    text = "the quick brown fox jumps over the lazy dog " * 8
    score = lm_scorer(a, Tok(), text, seqlen=32, max_tokens=256)
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    expect = -math.log(perplexity(b, Tok(), text, seqlen=32, max_tokens=256, show_progress=False)["perplexity"])
    assert score(sb) == pytest.approx(expect, rel=1e-6)
