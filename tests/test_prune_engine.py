"""The calibration engine and prune() on real module trees: tiny Llama blocks and the zoo's MLP."""
import copy

import pytest
import torch

import weightlab as wl
from weightlab.compress import MaskKeeper, SPDFSchedule, dead_neuron_rate, iterative_prune, reinitialize_pruned
from weightlab.compress.ap import ap_step
from weightlab.engine.calibration import find_blocks, layerwise, prunable_layers

transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n=8, seqlen=24, seed=0):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_find_blocks_and_layers():
    m = _llama()
    name, blocks = find_blocks(m)
    assert name == "model.layers" and len(blocks) == 3
    assert set(prunable_layers(blocks[0], "model.layers.0")) == {
        f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_layerwise_passes_compressed_outputs_on():
    """Block 1's statistics must come from block 0's outputs AFTER block 0 was changed."""
    m = _llama()
    seen = {}

    def on_block(i, name, layers, stats):
        seen[i] = stats[f"{name}.self_attn.q_proj"].sq_norms.clone()
        if i == 0:  # zero block 0's MLP output: block 1 then sees different inputs
            layers[f"{name}.mlp.down_proj"].weight.data.zero_()

    batches = [{"input_ids": b, "use_cache": False} for b in _ids().split(4)]
    layerwise(_llama(), batches, on_block)
    ref = {}
    layerwise(m, batches, lambda i, name, layers, stats: ref.setdefault(i, stats[f"{name}.self_attn.q_proj"]
                                                                        .sq_norms.clone()))
    assert torch.allclose(seen[0], ref[0])
    assert not torch.allclose(seen[1], ref[1])


def test_layerwise_holds_one_activation_cache():
    """The memory bound: a block's inputs are freed as its outputs replace them (one cache, not two)."""
    import weakref

    m = _llama()
    name, blocks = find_blocks(m)
    refs = []
    h = blocks[0].register_forward_pre_hook(lambda mod, args, kwargs: refs.append(weakref.ref(args[0] if args else
                                                                                              kwargs["hidden_states"])),
                                            with_kwargs=True)
    alive_at_block = {}

    def on_block(i, name, layers, stats):
        alive_at_block[i] = sum(r() is not None for r in refs[:2])  # the two captured block-0 input batches
        h.remove() if i == 0 else None

    layerwise(m, [{"input_ids": b, "use_cache": False} for b in _ids().split(4)], on_block)
    assert alive_at_block[0] == 2  # block 0 works on them
    assert alive_at_block[1] == 0  # replaced by block 0's outputs, nothing else keeps them


def test_prune_allocation_reads_weights_without_copies(monkeypatch):
    """prune() must not copy every weight up front (that doubled the peak memory on SmolLM2)."""
    import importlib

    P = importlib.import_module("weightlab.compress.prune")  # the package re-exports the function under that name

    calls = []
    real = P.weight_matrix
    monkeypatch.setattr(P, "weight_matrix", lambda mod: calls.append(1) or real(mod))
    m = _llama()
    wl.compress.prune(m, "magnitude", 0.5, show_progress=False)
    assert len(calls) == 21  # one working copy per layer, taken when that layer is pruned


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gblm"])
def test_prune_tiny_llama_exact_sparsity(method):
    m = _llama()
    rep = wl.compress.prune(m, method, 0.5, calib=_ids(), show_progress=False)
    assert rep.sparsity == pytest.approx(0.5, abs=1e-6)
    assert len(rep.layers) == 21
    for r in rep.layers:
        assert r["sparsity"] == pytest.approx(0.5, abs=1 / r["shape"][1])
    assert int((m.lm_head.weight == 0).sum()) == 0  # embeddings and head are not touched
    rep24 = wl.compress.prune(_llama(), method, 0.5, pattern="2:4", calib=_ids(), show_progress=False)
    for r in rep24.layers:
        assert r["sparsity"] == 0.5


def test_prune_output_error_ordering_on_model():
    dense = _llama()
    x = _ids(4, 24, seed=9)
    with torch.no_grad():
        ref = dense(x).logits
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = _llama()
        wl.compress.prune(m, method, 0.6, calib=_ids(16), show_progress=False)
        with torch.no_grad():
            errs[method] = float((m(x).logits - ref).pow(2).mean())
    assert errs["sparsegpt"] < errs["magnitude"] and errs["wanda"] < errs["magnitude"]


def test_prune_errors_before_work():
    m = _llama()
    for kwargs, msg in (({"method": "wandaa"}, "Did you mean 'wanda'"), ({"pattern": "3:2"}, "N:M"),
                        ({"pattern": "2:4", "allocation": "lamp"}, "uniform"), ({"sparsity": 1.5}, "sparsity"),
                        ({"allocation": "wanda"}, "allocation")):
        with pytest.raises(wl.ConfigError, match=msg):
            wl.compress.prune(m, **{"method": "wanda", **kwargs}, calib=_ids())
    assert int((m.model.layers[0].mlp.up_proj.weight == 0).sum()) == 0


@pytest.fixture(scope="module")
def digits_mlp():
    pytest.importorskip("sklearn")
    from weightlab import zoo

    return zoo.trained_classifier("digits", "mlp", seed=0), zoo.digits()


@pytest.mark.parametrize("method,allocation", [("magnitude", "uniform"), ("magnitude", "global"),
                                               ("magnitude", "lamp"), ("wanda", "uniform"),
                                               ("sparsegpt", "uniform"), ("magnitude", "rd")])
def test_prune_zoo_mlp_keeps_accuracy(digits_mlp, method, allocation):
    from weightlab import zoo

    model, data = digits_mlp
    m = copy.deepcopy(model)
    dense = zoo.accuracy(m, data.x_test, data.y_test)
    rep = wl.compress.prune(m, method, 0.5, allocation=allocation, calib=data.x_train[:512], show_progress=False)
    if allocation == "rd":  # the DP meets the budget at the granularity of its 11 levels
        assert 0.5 <= rep.sparsity <= 0.56
    else:
        assert rep.sparsity == pytest.approx(0.5, abs=0.005)
    assert zoo.accuracy(m, data.x_test, data.y_test) > dense - 0.08


def test_mask_keeper_and_spdf():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    wl.compress.prune(model, "magnitude", 0.5, show_progress=False)
    keeper = MaskKeeper(model)
    assert keeper.sparsity == pytest.approx(0.5, abs=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    keeper.attach(opt)
    sched = SPDFSchedule(keeper, sparse_steps=5)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    for step in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step < 4:
            for n, p in keeper.params.items():
                assert int((p[~keeper.masks[n]] != 0).sum()) == 0  # pruned weights stay exactly zero
        dense_now = sched.step()
    assert dense_now and any(int((p[~keeper.masks[n]] != 0).sum()) > 0 for n, p in keeper.params.items())


def test_ap_step_removes_only_slow_negative_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in start.items()}
    new = ap_step(model, start, masks, 0.05)
    removed = {n: masks[n] & ~new[n] for n in masks}
    assert sum(int(r.sum()) for r in removed.values()) == int(0.05 * 130)
    params = dict(model.named_parameters())
    moves = []
    for n, r in removed.items():
        assert bool((params[n].detach()[r] < 0).all())  # only negative weights
        moves += (params[n].detach() - start[n]).abs()[r].tolist()
    kept_neg = torch.cat([(params[n].detach() - start[n]).abs()[new[n] & (params[n].detach() < 0)] for n in new])
    assert max(moves) <= float(kept_neg.min())  # the least-moving ones


def test_iterative_prune_and_scratch_baseline(digits_mlp):
    from weightlab import zoo

    model, data = digits_mlp
    m = copy.deepcopy(model)

    def train(net, masks):
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        MaskKeeper(net, masks).attach(opt)
        for xb, yb in zip(data.x_train.split(128), data.y_train.split(128)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()

    masks = iterative_prune(m, train, rounds=2, rate=0.2, ap_rate=0.02)
    total = sum(mk.numel() for mk in masks.values())
    assert 1 - sum(int(mk.sum()) for mk in masks.values()) / total == pytest.approx(1 - 0.8 ** 2, abs=0.01)
    assert 0 <= dead_neuron_rate(m, data.x_test) <= 1
    re = reinitialize_pruned(copy.deepcopy(m), masks={f"{n}": mk for n, mk in masks.items()}, seed=1)
    assert all(mk.dtype == torch.bool for mk in re.values())
