"""A pruned model stays pruned through quantization: exact zeros kept on the grid, GPTQ compensating them,
and recipes handing each step the model the previous step left."""
import pytest
import torch

from weightlab.errors import ConfigError
from weightlab.tensor.gptq import gptq
from weightlab.tensor.quant import rtn

from _tiny_llama import tiny_llama


def _two_four(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    drop = W.abs().reshape(rows, -1, 4).argsort(-1)[..., :2]  # the 2 smallest of every 4
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, drop, True).reshape(rows, cols)
    return W.masked_fill(keep, 0), keep


def _correlated_h(cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                     dtype=torch.float64)
    return X.T @ X


def _proxy(W, Q, H):
    D = W - Q
    return float(torch.einsum("ij,jk,ik->", D, H, D))


def test_gptq_with_diagonal_hessian_and_kept_zeros_is_rtn_of_the_pruned_weights():
    # diagonal H: no error crosses columns, so GPTQ is RTN; kept zeros are on every grid (sym and asym)
    W, keep = _two_four(8, 64)
    H = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    for sym in (True, False):
        q, _ = gptq(W, H.clone(), bits=3, group_size=16, sym=sym, keep=keep, own_h=True)
        r = rtn(W, bits=3, group_size=16, sym=sym)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales)
        assert torch.all(q.dequantize()[keep] == 0)


def test_an_empty_mask_changes_nothing():
    W, _ = _two_four(16, 64)
    H = _correlated_h(64)
    a, la = gptq(W, H.clone(), bits=4, group_size=32)
    b, lb = gptq(W, H.clone(), bits=4, group_size=32, keep=torch.zeros_like(W, dtype=torch.bool))
    assert torch.equal(a.codes, b.codes) and la == lb


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_pruned_zeros_and_compensates_them(act_order):
    W, keep = _two_four(32, 128)
    H = _correlated_h(128)
    q, _ = gptq(W, H.clone(), bits=4, group_size=32, sym=True, act_order=act_order, keep=keep)
    Q = q.dequantize().double()
    assert torch.all(Q[keep] == 0) and (Q == 0).sum() >= keep.sum()
    g = q.g_idx.long()
    for r in range(0, 32, 7):  # at most 2^b levels in every (row, group)
        for grp in range(4):
            assert Q[r, g == grp].unique().numel() <= 16
    # zeroing plain GPTQ's output afterwards (what quantizing a pruned model without the mask amounts to) is
    # worse on the GPTQ objective than keeping the zeros inside the loop, where their error is compensated
    plain, _ = gptq(W, H.clone(), bits=4, group_size=32, sym=True, act_order=act_order)
    after = plain.dequantize().double().masked_fill(keep, 0)
    assert _proxy(W, Q, H) < 0.9 * _proxy(W, after, H)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kz") / "llama"
    tiny_llama(path, hidden=64, inter=128)
    return path


def _layers(folder):
    from weightlab.io.reader import open_checkpoint

    with open_checkpoint(folder) as ck:
        return {n: ck.get(n).float() for n in ck.names() if n.endswith("proj.weight")}


def _check_pruned_and_gridded(folder, group, bits):
    for n, w in _layers(folder).items():
        z = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(z >= 2), f"{n} lost its 2:4 zeros"
        for r in range(0, w.shape[0], 13):
            for c in range(0, w.shape[1], group):
                assert w[r, c:c + group].unique().numel() <= 2 ** bits, n


def test_recipe_prune_then_quantize_keeps_the_pruning(tiny, tmp_path):
    from weightlab.recipe import Recipe, run_recipe

    common = {"nsamples": 4, "seqlen": 32, "calib": "wiki"}
    recipe = Recipe(model=str(tiny), output=str(tmp_path / "out"), steps=[
        {"family": "compress", "method": "prune", "params": {"method": "sparsegpt", "pattern": "2:4", **common}},
        {"family": "compress", "method": "quantize",
         "params": {"method": "gptq", "bits": 4, "group_size": 32, "format": "hf", **common}}])
    run_recipe(recipe, show_progress=False)
    _check_pruned_and_gridded(tmp_path / "out", 32, 4)


def test_quantizers_without_a_zero_level_refuse_a_pruned_model(tiny):
    from weightlab.compress import prune, quantize
    from weightlab.io.hf import load_causal_lm

    model, tok = load_causal_lm(tiny)
    prune(model, "magnitude", 0.5, show_progress=False)
    with pytest.raises(ConfigError, match="no zero level"):
        quantize(model, "statsq", 4, show_progress=False)
    quantize(model, "statsq", 4, show_progress=False, keep_zeros=False)  # asked for: done, zeros requantized
    model, _ = load_causal_lm(tiny)
    prune(model, "magnitude", 0.5, show_progress=False)
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if n.endswith("proj")}
    rep = quantize(model, "rtn", 4, group_size=32, show_progress=False)
    for n, m in model.named_modules():
        if n in zeros:
            assert torch.all(m.weight[zeros[n]] == 0)
    assert sum(r["kept_zeros"] for r in rep.layers) == sum(int(z.sum()) for z in zeros.values())
