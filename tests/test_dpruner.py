"""D-Pruner as its public code computes it: the SparseGPT-saliency general importance, the regularized
SGD domain pass with summed dual scores, the block mask, and the CLI with two text files."""
import copy
import json

import pytest
import torch

from weightlab.compress.dpruner import DPrunerConfig, block_mask
from weightlab.compress.dpruner_domain import domain_importance, lr_at, regularized_grad, step_importance
from weightlab.compress.dpruner_general import general_importance, obs_saliency
from weightlab.tensor.pruning import layer_mask

transformers = pytest.importorskip("transformers")


def _tiny(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=64, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return m


def _layers(model):
    from weightlab.compress.prune import target_layers

    return target_layers(model)


def _cfg(**kw):
    base = dict(domain="wiki", epochs=1, batch_size=4, train=False)
    base.update(kw)
    return DPrunerConfig(**base)


IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- formulas
def test_regularized_grad_and_step_importance_by_hand():
    g, w, G = torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([3.0])
    gs = regularized_grad(g, G, lam=0.1, lr=0.03, scale=4.0)
    # S g = 2; 0.1 * 2 * 0.03^2 * 3 * 2^2 / 1000 = 2.16e-6
    assert gs.item() == pytest.approx(2.0 + 2.16e-6, rel=1e-7)
    t = 2.0 * 2.0  # (S g) w, the regularizer's share is below float32 resolution here
    assert step_importance(torch.tensor([2.0]), w).item() == pytest.approx(t + t * t / 2000 + 8.0)
    assert step_importance(torch.tensor([2.0]), w, cubic=False).item() == pytest.approx(t + t * t / 2000)
    assert torch.equal(regularized_grad(g, G, 0.0, 0.03, 4.0), g * 4)
    assert torch.equal(regularized_grad(g, None, 5.0, 0.03, 4.0), g * 4)


def test_lr_schedule_is_the_references_linear_warmup():
    assert lr_at(1, 10, 0.03, 0.1) == pytest.approx(0.03)  # progress 0.1 is already past the warmup
    assert lr_at(5, 10, 0.03, 0.1) == pytest.approx(0.03 * 0.5 / 0.9)
    assert lr_at(10, 10, 0.03, 0.1) == 0.0  # the last step moves nothing
    assert lr_at(1, 40, 0.03, 0.1) == pytest.approx(0.03 * 0.025 / 0.1)  # inside the warmup
    assert lr_at(1, 1, 0.03, 0.1) == pytest.approx(0.03 * 0.5 / 0.9)  # t_steps = max(2, n)


def test_large_lambda_ranking_follows_the_general_term():
    gen = torch.Generator().manual_seed(0)
    g = (torch.rand(200, generator=gen, dtype=torch.float64) + 0.5) * torch.sign(torch.randn(200, generator=gen))
    w = (torch.rand(200, generator=gen, dtype=torch.float64) + 0.5) * torch.sign(torch.randn(200, generator=gen))
    G = torch.rand(200, generator=gen, dtype=torch.float64) + 0.1
    s = step_importance(regularized_grad(g, G, lam=1e15, lr=0.03, scale=1.0), w)
    assert torch.equal(torch.argsort(s), torch.argsort(G * g * g * w.abs()))
    s0 = step_importance(regularized_grad(g, G, lam=0.0, lr=0.03, scale=1.0), w)
    assert not torch.equal(torch.argsort(s0), torch.argsort(s))


# ---------------------------------------------------------------- general importance
def test_obs_saliency_diagonal_hessian_closed_form():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=gen)
    h = torch.rand(8, generator=gen) + 0.5
    sal, pruned = obs_saliency(W, torch.diag(h), 0.5, blocksize=4, percdamp=0.01)
    hd = (h + 0.01 * h.mean()).double()
    want = W.double() ** 2 * hd.view(1, -1)  # U_jj^2 = 1 / (H_jj + damp): no cross terms, no updates
    torch.testing.assert_close(sal.double(), want, rtol=1e-6, atol=0)
    for b in (slice(0, 4), slice(4, 8)):  # the reference prunes score <= sorted[int(0.5 * 24)]: 13 entries
        s = want[:, b]
        thresh = torch.sort(s.reshape(-1)).values[12]
        torch.testing.assert_close(pruned[:, b], torch.where(s <= thresh, 0.0, W[:, b].double()).float())
        assert int((pruned[:, b] == 0).sum()) == 13


def test_obs_saliency_second_block_uses_the_obs_updated_weight():
    a, b = 0.75, 0.5
    H = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    sal, _ = obs_saliency(torch.tensor([[a, b]]), H, 0.5, blocksize=1, percdamp=0.0)
    Hi = torch.linalg.inv(H.double())
    p, r = Hi[0, 0], Hi[0, 1]
    assert sal[0, 0].item() == pytest.approx(a * a / p.item(), rel=1e-6)  # w^2 / [H^-1]_00
    b_new = b - a * r / p  # OBS: removing w0 moves w1 by -w0 [H^-1]_01 / [H^-1]_00
    assert sal[0, 1].item() == pytest.approx((b_new ** 2 * H[1, 1]).item(), rel=1e-6)  # U_11^2 = 1 / H_11


def _inputs_H(model, name, ids):
    mod = dict(model.named_modules())[name]
    xs = []
    h = mod.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    X = torch.cat(xs)
    return 2.0 / ids.shape[0] * X.T @ X


def test_general_pass_is_sequential_sparsegpt_saliency_and_restores_weights(one_thread):
    model = _tiny()
    layers = _layers(model)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    sal = general_importance(model, layers, [{"input_ids": IDS, "use_cache": False}], sparsity=0.5)
    assert all(torch.equal(m.weight, before[n]) for n, m in layers.items())
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    want0, _ = obs_saliency(before[q0], _inputs_H(model, q0, IDS), 0.5)
    torch.testing.assert_close(sal[q0], want0, rtol=1e-4, atol=1e-6)
    # block 1 sees block 0 pruned by that pass, as in the reference's sequential loop
    pruned = copy.deepcopy(model)
    for n, m in _layers(pruned).items():
        if n.startswith("model.layers.0."):
            with torch.no_grad():
                m.weight.copy_(obs_saliency(before[n], _inputs_H(model, n, IDS), 0.5)[1])
    want1, _ = obs_saliency(before[q1], _inputs_H(pruned, q1, IDS), 0.5)
    dense1, _ = obs_saliency(before[q1], _inputs_H(model, q1, IDS), 0.5)
    torch.testing.assert_close(sal[q1], want1, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(sal[q1], dense1, rtol=1e-3)


# ---------------------------------------------------------------- domain pass
def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_lambda0_and_zero_general_equal_the_plain_domain_taylor_score(one_thread):
    model = _tiny()
    layers = _layers(model)
    g = _grads(model, IDS)
    S = 65536.0
    want = {}
    for n, m in layers.items():
        t = S * g[n + ".weight"] * m.weight.detach()
        want[n] = (t + t * t / 2000 + m.weight.detach() ** 3).abs()
    G = {n: torch.rand(m.weight.shape) for n, m in layers.items()}
    zero = {n: torch.zeros(m.weight.shape) for n, m in layers.items()}
    for general, lam in ((G, 0.0), (zero, 5.0), (None, 0.1)):
        got = domain_importance(model, layers, IDS, general, _cfg(**{"lambda": lam}))
        for n in layers:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
    # the score-only variant sums the same score once per epoch
    got = domain_importance(model, layers, IDS, None, _cfg(epochs=3))
    for n in layers:
        torch.testing.assert_close(got[n], 3 * want[n], rtol=1e-4, atol=1e-5)


def test_training_pass_equals_hand_sgd_with_regularizer_and_global_clip(one_thread):
    model = _tiny()
    layers = _layers(model)
    ref = copy.deepcopy(model)
    G = {n: torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(3)) * 1e7
         for n, m in layers.items()}
    cfg = _cfg(train=True, epochs=2, **{"lambda": 0.1, "grad_scale": 1.0, "clip_grad_norm": 0.5})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = domain_importance(model, layers, IDS, G, cfg)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # original weights back
    # by hand: 2 steps over the same (whole) batch; lr 0.03 * 0.5/0.9, then 0
    want = {n: torch.zeros(m.weight.shape) for n, m in layers.items()}
    prev = 0.0
    for step in (1, 2):
        lr = lr_at(step, 2, 0.03, 0.1)
        g = _grads(ref, IDS)

        def reg(n, rate):
            gn = g[n]
            if n.removesuffix(".weight") in layers:
                Gn = G[n.removesuffix(".weight")]
                return gn + 0.1 * 2 * rate ** 2 * Gn * gn * gn / 1000
            return gn

        total = torch.sqrt(sum((reg(n, prev) ** 2).sum() for n in g))
        clip = min(float(0.5 / (total + 1e-6)), 1.0)
        assert clip < 1.0  # the clip is active in this check
        with torch.no_grad():
            for n, p in ref.named_parameters():
                gr = reg(n, lr)
                if n.removesuffix(".weight") in layers:
                    t = gr * p
                    want[n.removesuffix(".weight")] += (t + t * t / 2000 + p ** 3).abs()
                p -= lr * clip * gr
        prev = lr
        if step == 1:  # the regularizer visibly changed the update
            assert any(not torch.allclose(reg(n + ".weight", lr), g[n + ".weight"]) for n in layers)
    for n in layers:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- mask and CLI
def test_block_mask_prunes_exactly_within_each_column_block():
    s = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    m = block_mask(s, 0.5, blocks=2)
    assert torch.equal(m[:, :4], layer_mask(s[:, :4], 0.5)) and torch.equal(m[:, 4:], layer_mask(s[:, 4:], 0.5))
    assert torch.equal(block_mask(s, 0.5, blocks=1), layer_mask(s, 0.5))
    assert [int((~m[:, i:i + 4]).sum()) for i in (0, 4)] == [8, 8]


def test_config_defaults_and_alias():
    c = DPrunerConfig(domain="wiki")
    assert (c.lambda_, c.lr, c.epochs, c.batch_size, c.warmup, c.clip_grad_norm) == (0.1, 0.03, 5, 8, 0.1, 1.0)
    assert (c.grad_scale, c.reg_div, c.second_div, c.cubic, c.train, c.group, c.blocks) == (
        65536.0, 1000.0, 2000.0, True, True, "block", 32)
    assert DPrunerConfig(domain="wiki", **{"lambda": 0.0}).lambda_ == 0.0
    with pytest.raises(Exception):
        DPrunerConfig()  # the domain set is required


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_llama import tiny_llama

    from weightlab.io.refs import load_text

    d = tmp_path_factory.mktemp("dp")
    tiny_llama(d / "m")
    (d / "general.txt").write_text(load_text("wiki", "calib")[:20000])
    (d / "domain.txt").write_text(" ".join(f"The court held in case {i} that clause {i % 7} of the contract was "
                                           "void for lack of consideration." for i in range(300)))
    return d


def test_cli_prunes_with_open_domain_calib_and_domain_file(tiny_folder, tmp_path, one_thread):
    from weightlab.cli import main
    from weightlab.io.reader import open_checkpoint

    d = tiny_folder
    out = tmp_path / "out"
    args = ["prune", str(d / "m"), "-m", "dpruner", "--calib", str(d / "general.txt"), "-p",
            f"domain={d / 'domain.txt'}", "-s", "0.5", "--nsamples", "8", "--seqlen", "32", "-p", "epochs=2",
            "--eval", str(d / "domain.txt"), "--eval-tokens", "512", "--device", "cpu"]
    assert main([*args, "-o", str(out)]) == 0
    rep = json.loads((out / "prune-report.json").read_text())
    assert rep["method"] == "dpruner" and len(rep["layers"]) == 14
    with open_checkpoint(out) as ck:
        for r in rep["layers"]:
            w = ck.get(r["name"] + ".weight")
            assert int((w == 0).sum()) == w.numel() // 2, r["name"]
            for i in range(0, w.shape[1], w.shape[1] // 32):  # 32 column blocks, each exactly half pruned
                assert int((w[:, i:i + w.shape[1] // 32] == 0).sum()) == w.shape[0] * (w.shape[1] // 32) // 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS % 128).logits).all()
    # the domain set decides: another domain file gives another mask
    (d / "other.txt").write_text(load_other())
    args2 = [a if a != f"domain={d / 'domain.txt'}" else f"domain={d / 'other.txt'}" for a in args]
    assert main([*args2, "-o", str(tmp_path / "out2")]) == 0
    with open_checkpoint(out) as a, open_checkpoint(tmp_path / "out2") as b:
        n = rep["layers"][0]["name"] + ".weight"
        assert not torch.equal(a.get(n) == 0, b.get(n) == 0)
    assert main([*args[:5], *args[7:], "-o", str(tmp_path / "no-domain")]) != 0  # no -p domain=...


def load_other() -> str:
    return " ".join(f"{i} apples and {i + 3} pears were sold at the market on day {i % 5}." for i in range(300))


def test_missing_domain_file_is_refused_with_the_other_options(tmp_path):
    from weightlab.compress.checks import check_prune_request
    from weightlab.errors import ConfigError

    with pytest.raises(ConfigError, match="neither 'wiki' nor an existing"):
        check_prune_request("dpruner", 0.5, None, "uniform", {"domain": str(tmp_path / "missing.txt")})
    text = tmp_path / "news.txt"
    text.write_text("some domain text\n")
    assert check_prune_request("dpruner", 0.5, None, "uniform", {"domain": str(text)}) == 0.5
