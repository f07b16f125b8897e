"""BigNAS for the small transformer (net="lm"): views, zero-init, the sandwich step on next-character targets,
the forward against a hand-written attention, stand-alone children, parameter counts, search and the CLI."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from weightlab.cli import main
from weightlab.elastic.bignas import BigNASConfig, sandwich_step, soft_ce, train_bignas
from weightlab.elastic.bignas_io import Split, load_model, save_child, save_supernet
from weightlab.elastic.bignas_lm import (UNK, VOCAB, VOCAB_SIZE, ElasticLM, decode, encode, evaluate_lm,
                                         lm_param_count, text_arrays, windows)
from weightlab.elastic.bignas_nets import Child
from weightlab.elastic.bignas_search import all_children, coarse_grid, search
from weightlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    a = dict(vocab_size=11, context=8, d_model=8, layers=2, heads=2, mlp_hidden=8) | kw
    return ElasticLM(**a, dropout=dropout)


def _trained(net, steps=5, seed=0):
    """A few plain steps on random tokens so that no weight is at its (zero) init any more."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for s in range(steps):
        net.set_child(net.max_child())
        x = torch.randint(0, net.vocab_size, (4, net.context), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        opt.step()
    return net.eval()


def test_vocabulary_encode_decode_and_windows():
    assert VOCAB_SIZE == 97 and VOCAB[0] == "\n" and VOCAB[1] == " " and UNK == 96
    ids = encode("Ab\nz~é")
    assert ids.tolist() == [34, 67, 0, 91, 95, UNK] and decode(ids[:5]) == "Ab\nz~"
    x, y = windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ConfigError, match="no full window"):
        windows(torch.arange(3), 3)


def test_child_tensors_are_views_and_heads_are_the_leading_rows():
    net = _lm()
    params = list(net.parameters())
    for child in [net.min_child(), net.max_child()] + [net.random_child(random.Random(s)) for s in range(5)]:
        for name, t in net.child_tensors(child).items():
            base = t._base if t._base is not None else t
            assert any(p is base for p in params), name
            assert t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    c = Child((2, 8), (2,), (), (1, 2))
    t = net.child_tensors(c)
    assert t["blocks.0.attn.q.weight"].shape == (4, 8) and t["blocks.0.attn.out.weight"].shape == (8, 4)
    assert t["blocks.0.mlp.fc1.weight"].shape == (2, 8) and t["blocks.0.mlp.fc2.weight"].shape == (8, 2)
    assert t["blocks.0.attn.q.weight"].data_ptr() == net.blocks[0].attn.q.weight.data_ptr()
    assert t["blocks.1.attn.k.weight"].shape == (8, 8) and "blocks.2.ln1.weight" not in t
    with pytest.raises(ConfigError, match="heads"):
        net.set_child(Child((2, 8), (2,), (), (3, 2)))


def _reference(t, x, heads, hd):
    """The transformer written out by hand: per-head softmax(q k^T / sqrt(hd) + causal mask) v."""
    n, d = x.shape[1], t["tok_emb.weight"].shape[1]
    h = t["tok_emb.weight"][x] + t["pos_emb.weight"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)

    def ln(z, p):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * t[p + ".weight"] + t[p + ".bias"]

    for i, nh in enumerate(heads):
        p = f"blocks.{i}."
        a = ln(h, p + "ln1")
        outs = []
        for j in range(nh):
            sl = slice(j * hd, (j + 1) * hd)
            q, k, v = ((a @ t[f"{p}attn.{m}.weight"][sl].T + t[f"{p}attn.{m}.bias"][sl]) for m in "qkv")
            outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v)
        h = h + torch.cat(outs, -1) @ t[p + "attn.out.weight"].T + t[p + "attn.out.bias"]
        m = ln(h, p + "ln2") @ t[p + "mlp.fc1.weight"].T + t[p + "mlp.fc1.bias"]
        h = h + F.gelu(m) @ t[p + "mlp.fc2.weight"].T + t[p + "mlp.fc2.bias"]
    return ln(h, "ln_f") @ t["head.weight"].T + t["head.bias"]


def test_forward_matches_a_hand_written_transformer_and_the_exported_child():
    net = _trained(_lm())
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    for child in (Child((4, 6), (2,), (), (1, 2)), Child((8, 2), (1,), (), (2, 1)), net.max_child()):
        net.set_child(child)
        got = net(x)
        t = {k: v.detach() for k, v in net.child_tensors(child).items()}
        torch.testing.assert_close(got, _reference(t, x, child.heads[:child.depths[0]], net.head_dim),
                                   atol=1e-5, rtol=1e-5)
        static = net.static_child(child)
        assert all(p.untyped_storage().data_ptr() not in {q.untyped_storage().data_ptr() for q in net.parameters()}
                   for p in static.parameters())
        torch.testing.assert_close(static(x), got, atol=1e-6, rtol=1e-6)
        n = lm_param_count(11, 8, 8, 4, child.heads[:child.depths[0]], child.widths[:child.depths[0]])
        assert net.child_params(child) == sum(p.numel() for p in static.parameters()) == n


def test_parameter_count_by_hand():
    net = _lm()
    # embeddings 11*8 + 8*8; block: 2 LN (32), q/k/v 3*(8*4+4), out 4*8+8, fc1 8*2+2, fc2 2*8+8; ln_f 16; head 8*11+11
    one = 32 + 3 * (8 * 4 + 4) + (4 * 8 + 8) + (8 * 2 + 2) + (2 * 8 + 8)
    assert net.child_params(Child((2, 8), (1,), (), (1, 2))) == 88 + 64 + one + 16 + 99
    assert net.child_params(net.max_child()) == 88 + 64 + 2 * (32 + 3 * 72 + 72 + 72 + 72) + 16 + 99


def test_zero_init_makes_depth_only_children_equal_until_trained():
    net = _lm()
    assert all(torch.count_nonzero(b.attn.out.weight) == 0 and torch.count_nonzero(b.mlp.fc2.weight) == 0
               for b in net.blocks)
    x = torch.randint(0, 11, (4, 8))
    net.train()
    outs = []
    for d in (1, 2):
        net.set_child(Child((8, 8), (d,), (), (2, 2)))
        outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    cfg = BigNASConfig(net="lm", dropout=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for s in range(3):
        sandwich_step(net, opt, x, x.roll(-1, 1), cfg, random.Random(s))
    net.set_child(Child((8, 8), (1,), (), (2, 2)))
    a = net(x)
    net.set_child(Child((8, 8), (2,), (), (2, 2)))
    assert (a - net(x)).abs().max() > 1e-4


def test_sandwich_step_gradient_is_the_sum_of_per_child_gradients():
    cfg = BigNASConfig(net="lm", dropout=0.0, label_smoothing=0.1)
    net = _trained(_lm())
    x = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(2))
    y = x.roll(-1, 1)
    rng = random.Random(4)
    children = [net.max_child()] + [net.random_child(rng) for _ in range(cfg.num_random)] + [net.min_child()]
    net.train()
    total = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    teacher = None
    for i, c in enumerate(children):
        net.zero_grad(set_to_none=True)
        net.set_child(c)
        out = net(x).reshape(-1, 11)
        loss = F.cross_entropy(out, y.reshape(-1), label_smoothing=0.1) if i == 0 else soft_ce(out, teacher)
        loss.backward()
        if i == 0:
            teacher = F.softmax(out.detach(), 1)
        for k, p in net.named_parameters():
            if p.grad is not None:
                total[k] += p.grad
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    res = sandwich_step(net, opt, x, y, cfg, random.Random(4))
    assert res["children"] == children and res["teacher"].shape == (48, 11)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, total[k], atol=1e-6, rtol=1e-5)
    # the smallest child's distillation loss reaches only its slice: one head, a quarter of the MLP, one block
    net.zero_grad(set_to_none=True)
    net.set_child(net.min_child())
    soft_ce(net(x).reshape(-1, 11), teacher).backward()
    b0 = net.blocks[0]
    assert torch.count_nonzero(b0.attn.q.weight.grad[4:]) == 0 and b0.attn.q.weight.grad[:4].abs().sum() > 0
    assert torch.count_nonzero(b0.mlp.fc1.weight.grad[2:]) == 0 and net.blocks[1].ln1.weight.grad is None


def test_dropout_only_on_the_largest_child():
    net = _lm(dropout=0.5).train()
    x = torch.randint(0, 11, (4, 8))
    for child, stochastic in [(net.max_child(), True), (net.min_child(), False)]:
        net.set_child(child)
        assert (not torch.equal(net(x), net(x))) == stochastic


def test_lm_config_defaults_and_search_space():
    cfg = BigNASConfig(net="lm")
    assert (cfg.optimizer, cfg.lr, cfg.label_smoothing, cfg.epochs) == ("adamw", 3e-3, 0.0, 12)
    assert BigNASConfig(net="lm", lr=1e-3).lr == 1e-3 and BigNASConfig().optimizer == "sgd"
    net = _lm()
    assert len(all_children(net)) == 2 * (4 * 2) ** 2  # depth x (widths x heads) per block
    grid = coarse_grid(net)
    assert net.uniform_child(0.5) == Child((4, 4), (2,), (), (1, 1)) and net.uniform_child(0.5) in grid
    assert net.uniform_child(1.0, 1, heads=1) == Child((8, 8), (1,), (), (1, 1))
    with pytest.raises(ConfigError, match="kernel"):
        net.uniform_child(0.5, kernel=3)
    with pytest.raises(ConfigError, match="heads"):
        net.uniform_child(0.5, heads=3)
    assert "heads" not in Child((1,), (1,)).as_dict() and Child.from_dict(Child((1,), (1,), (), (2,)).as_dict()).heads


def _tiny_split(chars=6000):
    from weightlab.zoo import wiki_text

    text = wiki_text("calib")
    parts = [text[:chars], text[chars:chars + 1500], wiki_text("heldout")[:1500]]
    (xa, ya), (xv, yv), (xt, yt) = (windows(encode(p), 64) for p in parts)
    return Split("text", xa, ya, xv, yv, xt, yt, VOCAB_SIZE)


@pytest.mark.slow
def test_training_learns_and_search_picks_the_best_child_under_the_budget(tmp_path):
    split = _tiny_split(12000)
    res = train_bignas(split, BigNASConfig(net="lm", epochs=4, batch_size=16, lr=1e-2, warmup_epochs=0.3, seed=1))
    net = res.net
    assert res.history[-1]["loss_max"] < res.history[0]["loss_max"] < math.log(VOCAB_SIZE)
    net.set_child(net.max_child())
    d = evaluate_lm(net, split.x_val, split.y_val)
    assert d["bits_per_char"] < 5.0 and 0.1 < d["accuracy"] < 1  # uniform 6.6 bits; unigram about 4.4
    scores = {}

    def score(c):
        net.set_child(c)
        scores[c] = -evaluate_lm(net, split.x_val, split.y_val)["bits_per_char"]
        return scores[c]

    budget = net.child_params(net.uniform_child(0.5))
    r = search(net, score, max_params=budget, fine_steps=4, metric="bits_per_char")
    assert r.params <= budget and r.score == max(scores.values())
    assert r.as_dict()["bits_per_char"] == -r.score
    out = save_child(net, r.child, "text", tmp_path / "child")
    model, cfg = load_model(out)
    assert cfg["model_type"] == "weightlab-bignas-lm" and cfg["vocab"] == VOCAB
    net.set_child(r.child)
    torch.testing.assert_close(model(split.x_test[:4]), net(split.x_test[:4]), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    torch.set_num_threads(1)
    res = train_bignas(_tiny_split(), BigNASConfig(net="lm", epochs=1, batch_size=16, warmup_epochs=0.2))
    return save_supernet(res.net, "text", tmp_path_factory.mktemp("lm") / "sup", train_config=res.config.model_dump())


def _cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    c = capsys.readouterr()
    return code, c.out, c.out + c.err


@pytest.mark.slow
def test_cli_slice_info_eval_search_on_text(supernet, tmp_path, capsys):
    child = tmp_path / "child"
    code, _, log = _cli(capsys, "elastic", "slice", supernet, "--width", "0.5", "--depth", "2", "-o", child)
    assert code == 0, log
    cfg = json.loads((child / "config.json").read_text())
    own = lm_param_count(97, 64, 48, 12, [2, 2], [96, 96])
    assert cfg["arch"]["heads"] == [2, 2] and cfg["bignas"]["parameters"] == own
    code, out, _ = _cli(capsys, "info", child, "--json")
    assert json.loads(out)["num_parameters"] == own and json.loads(out)["config"]["vocab_size"] == 97
    code, out, log = _cli(capsys, "elastic", "eval", child, "--dataset", "text", "--json")
    d = json.loads(out)
    assert code == 0 and d["parameters"] == own and 0 < d["accuracy"] < 1 and d["samples"] == 6440
    assert d["bits_per_char"] == pytest.approx(math.log2(d["perplexity"]))
    code, out, log = _cli(capsys, "elastic", "search", supernet, "--max-params", own, "--fine-steps", "2", "--json")
    d = json.loads(out)
    assert code == 0, log
    assert d["parameters"] <= own and d["bits_per_char"] == min(-h["score"] for h in d["history"])
    code, _, log = _cli(capsys, "elastic", "slice", supernet, "--width", "0.5", "--kernel", "3", "-o", tmp_path / "k")
    assert code == 1 and "kernel" in log
    code, _, log = _cli(capsys, "elastic", "eval", child, "--dataset", "digits")
    assert code == 1 and "text" in log
    (tmp_path / "odd").mkdir()  # a zoo MLP folder that names no dataset cannot be scored on text
    cfg_odd = {"model_type": "weightlab-zoo-classifier", "kind": "mlp", "num_features": 64, "num_classes": 10,
               "hidden": [4]}
    (tmp_path / "odd" / "config.json").write_text(json.dumps(cfg_odd))
    from safetensors.torch import save_file
    from weightlab.zoo import MLP
    save_file(MLP(64, (4,), 10).state_dict(), str(tmp_path / "odd" / "model.safetensors"))
    code, _, log = _cli(capsys, "elastic", "eval", tmp_path / "odd", "--dataset", "text")
    assert code == 1 and "classifier" in log
    code, _, log = _cli(capsys, "elastic", "train", "bignas", "--dataset", "text", "--net", "cnn", "-o", tmp_path / "s")
    assert code == 1 and "does not fit" in log and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_cli_train_bignas_on_text(tmp_path, capsys):
    out = tmp_path / "sup"
    code, _, log = _cli(capsys, "elastic", "train", "bignas", "--dataset", "text", "--epochs", "1", "--seed", "2",
                        "-o", out)
    assert code == 0, log
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"]["net"] == "lm" and cfg["train"]["optimizer"] == "adamw" and cfg["train"]["seed"] == 2
