"""SLERP, NuSLERP, Model Stock, Breadcrumbs, DELLA, passthrough; per-layer gradients and name filters."""
import math

import pytest
import torch

import weightlab as wl
from weightlab.merge import schedule
from weightlab.merge.breadcrumbs import breadcrumbs_mask
from weightlab.merge.context import make_context
from weightlab.merge.della import keep_probabilities, magprune
from weightlab.merge.model_stock import model_stock_tensor
from weightlab.merge.slerp import nuslerp_tensors, slerp_tensors
from weightlab.registry import get_method


def rule(name):
    return get_method("merge", name)


# ------------------------------------------------------------------ slerp / nuslerp

def test_slerp_hand_computed_on_orthogonal_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = slerp_tensors(0.5, e1, e2)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    # 2x and 1x norms: the endpoints keep their norms, the angle is interpolated: t=1/3 -> 30 degrees
    out = slerp_tensors(1 / 3, 2 * e1, e2)
    s = math.sin(math.pi / 2)
    want = 2 * math.sin(math.pi / 3) / s * e1 + math.sin(math.pi / 6) / s * e2
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(slerp_tensors(0.0, e1, e2), e1) and torch.allclose(slerp_tensors(1.0, e1, e2), e2)


def test_slerp_keeps_the_norm_of_equal_norm_tensors_and_lerps_parallel_ones():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    b = b * a.norm() / b.norm()
    for t in (0.1, 0.5, 0.9):
        assert torch.allclose(slerp_tensors(t, a, b).norm(), a.norm(), rtol=1e-10)
    par = 3 * a + 1e-9 * b  # cos > 0.9995: the linear interpolation
    assert torch.allclose(slerp_tensors(0.3, a, par), 0.7 * a + 0.3 * par)


def test_nuslerp_weight_ratio_rows_and_task_vectors():
    g = torch.Generator().manual_seed(1)
    a, b, base = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    f = rule("nuslerp").fn
    cfg = rule("nuslerp").make_config({})
    out = f([a, b], None, make_context("w", cfg, weights=[1.0, 3.0], n=2))
    assert torch.allclose(out, slerp_tensors(0.75, a, b))  # t = w2 / (w1 + w2), flattened like slerp
    rows = rule("nuslerp").make_config({"flatten": False})
    out = f([a, b], None, make_context("w", rows, weights=[1.0, 1.0], n=2))
    for i in range(4):  # one angle per row (vectors along the last dim)
        assert torch.allclose(out[i], slerp_tensors(0.5, a[i], b[i]))
    cols = rule("nuslerp").make_config({"flatten": False, "row_wise": True})
    out = f([a, b], None, make_context("w", cols, weights=[1.0, 1.0], n=2))
    for j in range(6):  # row_wise: vectors along dim 0
        assert torch.allclose(out[:, j], slerp_tensors(0.5, a[:, j], b[:, j]))
    out = f([a, b], base, make_context("w", cfg, weights=[1.0, 1.0], n=2))
    assert torch.allclose(out, base + slerp_tensors(0.5, a - base, b - base))
    assert torch.allclose(nuslerp_tensors(0.5, a, 2 * a), 1.5 * a)  # parallel rows: the linear interpolation


# ------------------------------------------------------------------ model stock

def test_model_stock_ratio_follows_the_angle():
    base = torch.zeros(2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(model_stock_tensor(base, [e1, e2]), base)  # orthogonal: t = 0
    assert torch.allclose(model_stock_tensor(base, [e1, e1]), e1)  # parallel: t = 1, the average
    # cos = 0.5 between the offsets, N = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(0.75)])
    b = torch.tensor([3.0, -1.0])
    out = model_stock_tensor(b, [b + w1, b + w2])
    assert torch.allclose(out, b + (2 / 3) * (w1 + w2) / 2, atol=1e-6)


def test_model_stock_filter_wise_uses_one_angle_per_row():
    base = torch.zeros(2, 2)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 0 orthogonal (t=0), row 1 parallel (t=1)
    out = model_stock_tensor(base, [m1, m2], filter_wise=True)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_model_stock_in_row_chunks_equals_one_pass():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(37, 11, generator=g, dtype=torch.float64)
    ms = [base + 0.1 * torch.randn(37, 11, generator=g, dtype=torch.float64) for _ in range(3)]
    for fw in (False, True):
        assert torch.allclose(model_stock_tensor(base, ms, fw, chunk=20), model_stock_tensor(base, ms, fw), atol=1e-12)


# ------------------------------------------------------------------ breadcrumbs / della

def test_breadcrumbs_drops_outliers_and_small_entries():
    g = torch.Generator().manual_seed(0)
    x = (torch.randperm(100, generator=g) + 1).float() * torch.where(torch.rand(100, generator=g) < 0.5, -1, 1)
    m = breadcrumbs_mask(x, density=0.9, gamma=0.05)
    kept = x[m].abs().sort().values
    assert m.sum() == 90 and torch.equal(kept, torch.arange(6, 96).float())  # 5 smallest and 5 largest gone
    small = torch.tensor([5.0, -1.0, 4.0, 2.0, -3.0])  # n_top = int(0.01 * 5) = 0: only the small ones go
    assert breadcrumbs_mask(small, 0.6, 0.01).tolist() == [True, False, True, False, True]
    # density + gamma > 1: fewer outliers removed so that the density is met
    assert breadcrumbs_mask(small, 0.8, 0.5).sum() == 4


def test_breadcrumbs_rule_combines_linearly_or_with_ties():
    base = torch.zeros(5)
    a = torch.tensor([5.0, -1.0, 4.0, 2.0, -3.0])
    b = torch.tensor([-6.0, 1.0, 1.0, 2.0, 3.0])
    lin = rule("breadcrumbs").make_config({"density": 0.6, "gamma": 0.01})
    out = rule("breadcrumbs").fn([a, b], base, make_context("w", lin, n=2))
    assert out.tolist() == [5.0 - 6.0, 0.0, 4.0, 2.0, -3.0 + 3.0]  # b keeps -6, 2, 3 (ties at 1: first index)
    ties = rule("breadcrumbs").make_config({"density": 0.6, "gamma": 0.01, "combine": "ties", "normalize": True})
    out = rule("breadcrumbs").fn([a, b], base, make_context("w", ties, n=2))
    assert out.tolist() == [-6.0, 0.0, 4.0, 2.0, 3.0]  # sign consensus (sum 0 -> +), disjoint mean


def test_della_keep_probabilities_and_rescaling():
    p = keep_probabilities(torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.float64), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.5]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 512, generator=g, dtype=torch.float64)
    l1 = magprune(d, 0.3, 0.1, "l1", torch.Generator().manual_seed(1))
    assert torch.allclose(l1.abs().sum(), d.abs().sum()) and 0.25 < (l1 != 0).double().mean() < 0.35
    # the paper's rescale (1 / keep probability) is unbiased: the mean over many draws approaches the input
    draws = torch.stack([magprune(d[:4], 0.3, 0.1, "inverse", torch.Generator().manual_seed(s)) for s in range(400)])
    assert (draws.mean(0) - d[:4]).abs().mean() < 0.1 * d[:4].abs().mean()
    # larger entries are kept more often
    keep = (draws != 0).double().mean(0)
    big = d[:4].abs() > d[:4].abs().median()
    assert keep[big].mean() > keep[~big].mean() + 0.05
    with pytest.raises(wl.ConfigError, match="epsilon"):
        rule("della").make_config({"density": 0.1, "epsilon": 0.2})


def test_della_is_seeded_per_tensor():
    base = torch.zeros(50)
    ms = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = rule("della").make_config({"density": 0.5})
    a = rule("della").fn(ms, base, make_context("w", cfg, n=2, seed=3))
    b = rule("della").fn(ms, base, make_context("w", cfg, n=2, seed=3))
    c = rule("della").fn(ms, base, make_context("w", cfg, n=2, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ settings

def test_schedule_gradients_and_filters_as_mergekit_reads_them():
    assert schedule.evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert schedule.evaluate([0.0, 0.5, 1.0], "x", 0.75) == pytest.approx(0.75)
    assert schedule.evaluate([0.0, 0.2, 1.0], "x", 0.75) == pytest.approx(0.6)
    assert schedule.evaluate([0.0, 1.0], "x", 1.0) == 1.0
    f = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    assert schedule.evaluate(f, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert schedule.evaluate(f, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert schedule.evaluate(f, "model.norm.weight", 0.0) == 0.5
    assert schedule.evaluate(f[:2], "model.norm.weight", 0.0) is None  # no entry matches: the next level decides
    pos = schedule.layer_positions(["model.embed_tokens.weight", "model.layers.0.w", "model.layers.3.w"])
    assert pos == {"model.embed_tokens.weight": 0.0, "model.layers.0.w": 0.0, "model.layers.3.w": 1.0}
    for bad in ([], [{"filter": "a"}], [{"value": 1}, 2]):
        with pytest.raises(wl.ConfigError):
            schedule.check(bad, "t")


def _layered(tmp_path, name, value, layers=4):
    sd = {"model.embed_tokens.weight": torch.full((6, 4), value), "model.norm.weight": torch.full((4,), value)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.full((4, 4), value + i)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.full((8, 4), value + i)
    return wl.save_state_dict(sd, tmp_path / name)


def test_gradient_weights_and_filters_in_the_engine(tmp_path):
    from weightlab.merge.engine import run_merge
    from weightlab.merge.job import MergeJob

    a, b = _layered(tmp_path, "a", 0.0), _layered(tmp_path, "b", 10.0)
    job = MergeJob(method="linear", models=[{"path": str(a), "weight": [1.0, 0.0]},
                                            {"path": str(b), "weight": [0.0, 1.0]}])
    sd = run_merge(job).state_dict
    for i in range(4):  # t = i/3: weights (1 - t, t), normalized
        t = i / 3
        assert torch.allclose(sd[f"model.layers.{i}.mlp.up_proj.weight"], torch.full((8, 4), i + 10.0 * t))
    assert torch.equal(sd["model.norm.weight"], torch.zeros(4))  # outside the layers t = 0
    f = [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]
    sd = run_merge(MergeJob(method="slerp", models=[str(a), str(b)], params={"t": f})).state_dict
    assert torch.equal(sd["model.layers.2.self_attn.q_proj.weight"], torch.full((4, 4), 2.0))
    assert torch.allclose(sd["model.layers.2.mlp.up_proj.weight"], torch.full((8, 4), 12.0))
    with pytest.raises(wl.ConfigError, match="no parameter"):
        run_merge(MergeJob(method="slerp", models=[str(a), str(b)], params={"tt": 0.5}))
    with pytest.raises(wl.ConfigError, match="at most 2 models"):
        run_merge(MergeJob(method="slerp", models=[str(a), str(b), str(a)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slices_stack_layers_and_rewrite_the_config(tmp_path):
    import json

    from weightlab.merge.engine import run_merge
    from weightlab.merge.job import MergeJob

    a = _layered(tmp_path, "a", 0.0)
    cfg = json.loads((a / "config.json").read_text()) if (a / "config.json").exists() else {}
    cfg.update({"num_hidden_layers": 4, "layer_types": ["x0", "x1", "x2", "x3"], "architectures": ["Toy"]})
    (a / "config.json").write_text(json.dumps(cfg))
    job = MergeJob(method="passthrough", slices=[{"sources": [{"path": str(a), "layer_range": [0, 3]}]},
                                                 {"sources": [{"path": str(a), "layer_range": [1, 4],
                                                               "params": {"scale": 2.0}}]}])
    out = run_merge(job, tmp_path / "franken").output
    sd = wl.open_checkpoint(out)
    names = sd.names()
    assert sum(".q_proj." in n for n in names) == 6
    want = [0, 1, 2, 2 * 1, 2 * 2, 2 * 3]  # layers 0-2, then layers 1-3 scaled by 2
    for i, w in enumerate(want):
        assert torch.equal(sd.get(f"model.layers.{i}.self_attn.q_proj.weight"), torch.full((4, 4), float(w)))
    got = json.loads((out / "config.json").read_text())
    assert got["num_hidden_layers"] == 6 and got["layer_types"] == ["x0", "x1", "x2", "x1", "x2", "x3"]


def test_slices_validation_lists_problems_before_writing(tmp_path):
    from weightlab.merge.engine import run_merge
    from weightlab.merge.job import MergeJob

    a, b = _layered(tmp_path, "a", 0.0), _layered(tmp_path, "b", 1.0, layers=2)
    with pytest.raises(Exception, match="same number of layers"):
        MergeJob(method="linear", slices=[{"sources": [{"path": str(a), "layer_range": [0, 2]},
                                                       {"path": str(b), "layer_range": [0, 1]}]}])
    job = MergeJob(method="linear", slices=[{"sources": [{"path": str(a), "layer_range": [2, 4]},
                                                         {"path": str(b), "layer_range": [1, 3]}]}])
    with pytest.raises(wl.ConfigError, match=r"layer_range \[1, 3\] is outside"):
        run_merge(job, tmp_path / "out")
    job = MergeJob(method="ties", slices=[{"sources": [{"path": str(a), "layer_range": [0, 2]},
                                                       {"path": str(b), "layer_range": [0, 2]}]}])
    with pytest.raises(wl.ConfigError, match="needs a base among the slice's sources"):
        run_merge(job, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mergekit_yaml_slices_gradients_and_new_methods(tmp_path):
    from weightlab.merge.api import load_merge_config

    cfg = tmp_path / "mk.yaml"
    cfg.write_text("""
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 4]
      - model: /m/b
        layer_range: [0, 4]
merge_method: slerp
base_model: /m/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
    job = load_merge_config(cfg)
    assert job.method == "slerp" and job.slices[0].base == "/m/a" and job.params["t"][2]["value"] == 0.5
    assert [m.path for m in job.models] == ["/m/a", "/m/b"]
    for method, want in (("breadcrumbs_ties", ("breadcrumbs", "ties")), ("della_linear", ("della", "linear")),
                         ("model_stock", ("model-stock", None)), ("nuslerp", ("nuslerp", None))):
        (tmp_path / "m.yaml").write_text(f"merge_method: {method}\nbase_model: /m/a\nmodels: [{{model: /m/a}}, "
                                         "{model: /m/b, parameters: {weight: [0, 1], gamma: 0.02}}, {model: /m/c}]\n")
        if method in ("model_stock", "nuslerp"):
            (tmp_path / "m.yaml").write_text((tmp_path / "m.yaml").read_text().replace(", gamma: 0.02", ""))
        job = load_merge_config(tmp_path / "m.yaml")
        assert job.method == want[0] and job.base == "/m/a" and [m.path for m in job.models] == ["/m/b", "/m/c"]
        assert job.models[0].weight == [0.0, 1.0] and job.params.get("combine") == want[1]
    (tmp_path / "m.yaml").write_text("merge_method: karcher\nmodels: [{model: /m/a}]\n")
    with pytest.raises(wl.ConfigError, match="karcher"):
        load_merge_config(tmp_path / "m.yaml")


def test_tokenizer_union_reindexes_embedding_rows(tmp_path):
    import json

    pytest.importorskip("transformers")
    from _tiny_llama import tiny_tokenizer
    from transformers import AutoTokenizer

    from weightlab.merge.engine import run_merge
    from weightlab.merge.job import MergeJob

    paths = []
    for name, extra in (("a", 0), ("b", 2)):
        tpl = tmp_path / f"{name}-tpl"
        tpl.mkdir()
        tiny_tokenizer(tpl, vocab_size=64)
        if extra:
            tok = AutoTokenizer.from_pretrained(str(tpl))
            tok.add_tokens(["<x0>", "<x1>"])
            tok.save_pretrained(str(tpl))
        (tpl / "config.json").write_text(json.dumps({"architectures": ["Toy"], "vocab_size": 64 + extra}))
        emb = torch.arange((64 + extra) * 2, dtype=torch.float32).reshape(-1, 2) + (0 if not extra else 1000)
        paths.append(wl.save_state_dict({"model.embed_tokens.weight": emb, "w": torch.ones(2)}, tmp_path / name,
                                        template=tpl))
    job = MergeJob(method="linear", models=[str(p) for p in paths], tokenizer_source="union")
    out = run_merge(job, tmp_path / "out").output
    emb = wl.open_checkpoint(out).get("model.embed_tokens.weight")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert emb.shape == (66, 2) and len(tok.get_vocab()) == 66
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    i = tok.convert_tokens_to_ids("<x1>")
    assert torch.equal(emb[i], torch.tensor([1000.0 + 2 * 65, 1000.0 + 2 * 65 + 1]))  # only b has it: b's row
    assert torch.equal(emb[5], torch.tensor([500.0 + 10, 500.0 + 11]))  # both have it: the mean
    with pytest.raises(wl.ConfigError, match="shape mismatch"):
        run_merge(MergeJob(method="linear", models=[str(p) for p in paths]), tmp_path / "out2")


def test_consensus_in_chunks_equals_one_pass():
    from weightlab.merge.combine import combine_deltas, disjoint_merge

    g = torch.Generator().manual_seed(3)
    ds = [torch.randn(50, 7, generator=g) * (torch.rand(50, 7, generator=g) < 0.5) for _ in range(3)]
    ds[1][0, 0], ds[2][0, 0], ds[0][0, 0] = 1.0, -1.0, 0.0  # a sum of exactly 0: + by the positive rule
    for norm in (True, False):
        want = disjoint_merge(ds, [1.0, 0.5, 0.7], "positive", norm)
        assert torch.equal(combine_deltas(ds, [1.0, 0.5, 0.7], True, norm, "positive", chunk=13), want)


def test_della_per_model_density_refused_before_any_output(tmp_path):
    from weightlab.merge.engine import run_merge
    from weightlab.merge.job import MergeJob

    base, a = _layered(tmp_path, "base", 0.0), _layered(tmp_path, "a", 1.0)
    job = MergeJob(method="della", base=str(base), models=[{"path": str(a), "density": 0.1}])  # 0.1 - 0.15 < 0
    with pytest.raises(wl.ConfigError, match="density \\+- epsilon"):
        run_merge(job, tmp_path / "out")
    assert not (tmp_path / "out").exists()
