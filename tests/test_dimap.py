"""DIMAP (He & Zhou, ICLR 2024): Eq. 10 scores, QKV/PRJ/MLP modules across stages, AUX kept dense.

The hand-computed cases give masks that LAMP within regex groups (the old allocation, which also pruned
AUX layers at the target), global magnitude and plain LAMP do not give."""
import pytest
import torch
from torch import nn

from weightlab.compress import prune
from weightlab.compress.dimap import (dimap, dimap_counts, dimap_masks, dimap_scores, module_of, module_rate,
                                      stage_of)
from weightlab.errors import ConfigError
from weightlab.registry import get_method

T = torch.tensor


def _alloc(name, weights, sparsity):
    return get_method("compress", name).fn(weights, sparsity)


def _swin_case():
    # two stages (timm names); the stage-1 attention is 10x smaller, the patch merging tiny
    return {"layers.0.blocks.0.attn.qkv": T([[4.0, 3.0], [2.0, 1.0]]),
            "layers.1.blocks.0.attn.qkv": T([[0.4, 0.4], [0.3, 0.1]]),
            "layers.0.blocks.0.mlp.fc1": T([[1.0, -0.5], [0.25, 2.0]]),
            "layers.0.downsample.reduction": T([[0.01, 0.02], [0.03, 0.04]])}


def test_hand_computed_two_stage_case_differs_from_lamp_groups_and_global_magnitude():
    w = _swin_case()
    # 16 weights, 12 in QKV-M + MLP-M; 37.5% of all = 6 weights -> each module loses r = 6/12 = 50%
    assert module_rate(w, 0.375) == pytest.approx(0.5)
    s = dimap_scores(w)
    # Eq. 10 per layer, largest first: 4,3,2,1 -> 16/16, 9/25, 4/29, 1/30
    # and 0.4,0.4,0.3,0.1 -> 1, .16/.32, .09/.41, .01/.42
    assert torch.allclose(s["layers.0.blocks.0.attn.qkv"], T([[1.0, 9 / 25], [4 / 29, 1 / 30]]))
    assert torch.allclose(s["layers.1.blocks.0.attn.qkv"], T([[1.0, 0.5], [0.09 / 0.41, 0.01 / 0.42]]))
    # QKV-M (both stages, one threshold): the 4 lowest are .01/.42, 1/30, 4/29, .09/.41 -> 2 from each stage
    # MLP-M: 2.0, 1.0, -0.5, 0.25 -> 1, 1/5, .25/5.25, .0625/5.3125 -> -0.5 and 0.25 go; AUX-M stays dense
    alloc = dimap(w, 0.375)
    assert alloc == {"layers.0.blocks.0.attn.qkv": 0.5, "layers.1.blocks.0.attn.qkv": 0.5,
                     "layers.0.blocks.0.mlp.fc1": 0.5, "layers.0.downsample.reduction": 0.0}
    m = dimap_masks(w, 0.375)
    assert torch.equal(m["layers.0.blocks.0.attn.qkv"], T([[True, True], [False, False]]))
    assert torch.equal(m["layers.1.blocks.0.attn.qkv"], T([[True, True], [False, False]]))
    assert torch.equal(m["layers.0.blocks.0.mlp.fc1"], T([[True, False], [False, True]]))
    assert bool(m["layers.0.downsample.reduction"].all())
    # global magnitude empties the patch merging and never touches the big stage-0 attention
    g = _alloc("global", w, 0.375)
    assert g["layers.0.downsample.reduction"] == 1.0 and g["layers.0.blocks.0.attn.qkv"] == 0.0
    for other in ("global", "lamp", "uniform"):
        assert _alloc(other, w, 0.375) != alloc, other
    # Table 4's "model as module" (one threshold over QKV-M and MLP-M; fc1 scores 1, 1/5, .25/5.25, .0625/5.3125):
    # the 6 lowest are .0625/5.3125, .01/.42, 1/30, .25/5.25, 4/29, 1/5 -> fc1 loses 3, stage-1 attention 1
    assert dimap_counts(w, 0.375, model_as_module=True) == {
        "layers.0.blocks.0.attn.qkv": 2, "layers.1.blocks.0.attn.qkv": 1, "layers.0.blocks.0.mlp.fc1": 3,
        "layers.0.downsample.reduction": 0}
    # the old allocation (LAMP per regex group, every group incl. AUX at 37.5%): 3 of the 8 QKV weights,
    # i.e. only one from stage 1, and one patch-merging weight
    assert alloc["layers.1.blocks.0.attn.qkv"] != 0.25 and alloc["layers.0.downsample.reduction"] != 0.25


def test_split_q_k_v_are_scored_as_the_papers_fused_qkv_matrix():
    pre0, pre1 = "swin.encoder.layers.0.blocks.0.attention.self", "swin.encoder.layers.1.blocks.0.attention.self"
    w = {f"{pre0}.query": T([[4.0, 3.0]]), f"{pre0}.key": T([[2.0, 1.0]]), f"{pre0}.value": T([[0.5, 0.5]]),
         f"{pre1}.query": T([[1.0, 0.1]]), f"{pre1}.key": T([[0.8, 0.2]]), f"{pre1}.value": T([[0.6, 0.3]]),
         "swin.encoder.layers.0.downsample.reduction": T([[0.05, 0.05, 0.05, 0.05]])}
    s = dimap_scores(w)
    # stage 0 fused: 4,3,2,1,.5,.5 -> cumulative energy 16,25,29,30,30.25,30.5
    assert torch.allclose(s[f"{pre0}.value"], T([[0.25 / 30.25, 0.25 / 30.5]]))
    assert torch.allclose(s[f"{pre0}.key"], T([[4 / 29, 1 / 30]]))
    # stage 1 fused: 1,.8,.6,.3,.2,.1 -> 1, 1.64, 2.0, 2.09, 2.13, 2.14
    assert torch.allclose(s[f"{pre1}.query"], T([[1.0, 0.01 / 2.14]]))
    assert torch.allclose(s[f"{pre1}.key"], T([[0.64 / 1.64, 0.04 / 2.13]]))
    # 6 of the 12 q/k/v weights go: .01/2.14, .25/30.5, .25/30.25, .04/2.13, 1/30, .09/2.09
    assert dimap_counts(w, 0.375) == {f"{pre0}.query": 0, f"{pre0}.key": 1, f"{pre0}.value": 2,
                                      f"{pre1}.query": 1, f"{pre1}.key": 1, f"{pre1}.value": 1,
                                      "swin.encoder.layers.0.downsample.reduction": 0}
    # scored per separate matrix the stage-0 value (1, .5) would outrank the key's 1.0 (score .2) and survive


def _random_swin(seed=0):
    g = torch.Generator().manual_seed(seed)
    w, dims = {}, (8, 16)
    for s, d in enumerate(dims):
        for b in range(2):
            p = f"swin.encoder.layers.{s}.blocks.{b}"
            scale = 0.1 * (s + 1) * (b + 1)  # different weight distributions per stage and block
            for n, shape in (("attention.self.query", (d, d)), ("attention.self.key", (d, d)),
                             ("attention.self.value", (d, d)), ("attention.output.dense", (d, d)),
                             ("intermediate.dense", (4 * d, d)), ("output.dense", (d, 4 * d))):
                w[f"{p}.{n}"] = torch.randn(*shape, generator=g) * scale
        if s == 0:
            w[f"swin.encoder.layers.{s}.downsample.reduction"] = torch.randn(2 * d, 4 * d, generator=g) * 0.01
    return w


def test_exact_sparsity_per_module_aux_dense_and_layer_max_kept():
    w = _random_swin()
    for sparsity in (0.3, 0.5, 0.7):
        r = module_rate(w, sparsity)
        masks = dimap_masks(w, sparsity)
        for module in ("qkv", "prj", "mlp"):
            names = [n for n in w if module_of(n) == module]
            size = sum(w[n].numel() for n in names)
            assert sum(int((~masks[n]).sum()) for n in names) == int(r * size)
        assert all(bool(masks[n].all()) for n in w if module_of(n) == "aux")
        for n, x in w.items():  # Eq. 10 scores 1 at each layer's largest |w|: it is the last to go
            assert bool(masks[n].reshape(-1)[x.abs().argmax()])
        total = sum(x.numel() for x in w.values())
        assert sum(int((~m).sum()) for m in masks.values()) == pytest.approx(sparsity * total, abs=3)


def test_scale_invariant_per_layer_unlike_global_magnitude():
    w = _random_swin(1)
    big = dict(w, **{"swin.encoder.layers.1.blocks.0.intermediate.dense":
                     w["swin.encoder.layers.1.blocks.0.intermediate.dense"] * 1000})
    assert dimap(big, 0.5) == dimap(w, 0.5)
    assert _alloc("global", big, 0.5) != _alloc("global", w, 0.5)


def test_module_and_stage_assignment_for_swin_vit_bert_llama_gpt2_names():
    cases = {"swin.encoder.layers.2.blocks.5.attention.self.query": ("qkv", 2),
             "swin.encoder.layers.2.blocks.5.attention.self.value": ("qkv", 2),
             "swin.encoder.layers.2.blocks.5.attention.output.dense": ("prj", 2),
             "swin.encoder.layers.2.blocks.5.intermediate.dense": ("mlp", 2),
             "swin.encoder.layers.2.blocks.5.output.dense": ("mlp", 2),
             "swin.encoder.layers.1.downsample.reduction": ("aux", 1),
             "swin.embeddings.patch_embeddings.projection": ("aux", None),
             "classifier": ("aux", None),
             "layers.3.blocks.0.attn.qkv": ("qkv", 3), "stages.1.blocks.2.attn.proj": ("prj", 1),
             "stages.1.blocks.2.mlp.fc2": ("mlp", 1), "patch_embed.proj": ("aux", None),
             "stages.0.downsample.reduction": ("aux", 0), "head.fc": ("aux", None),
             "bert.encoder.layer.0.attention.self.key": ("qkv", None),
             "bert.encoder.layer.0.attention.output.dense": ("prj", None),
             "bert.encoder.layer.0.output.dense": ("mlp", None), "bert.pooler.dense": ("aux", None),
             "model.layers.3.self_attn.k_proj": ("qkv", None), "model.layers.3.self_attn.o_proj": ("prj", None),
             "model.layers.3.mlp.gate_proj": ("mlp", None), "model.layers.3.mlp.down_proj": ("mlp", None),
             "lm_head": ("aux", None), "transformer.h.0.attn.c_attn": ("qkv", None),
             "transformer.h.0.attn.c_proj": ("prj", None), "transformer.h.0.mlp.c_proj": ("mlp", None)}
    for name, (module, stage) in cases.items():
        assert (module_of(name), stage_of(name)) == (module, stage), name


def test_without_aux_layers_every_module_is_at_the_target():
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(50, 50, generator=g) * 10, torch.randn(50, 50, generator=g) * 0.01
    d = dimap({"l.0.self_attn.q_proj": big, "l.0.mlp.up_proj": small}, 0.3)
    assert d == {"l.0.self_attn.q_proj": pytest.approx(0.3), "l.0.mlp.up_proj": pytest.approx(0.3)}


def test_errors():
    with pytest.raises(ConfigError, match="no attention"):
        dimap({"conv1": torch.randn(4, 4), "fc": torch.randn(2, 4)}, 0.5)
    w = {"layers.0.blocks.0.attn.qkv": torch.randn(4, 4), "layers.0.downsample.reduction": torch.randn(4, 16)}
    with pytest.raises(ConfigError, match="cannot be reached"):
        dimap(w, 0.5)  # the attention holds 16 of 80 weights; half of all cannot come from it


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class _Stage(nn.Module):
    def __init__(self, d, merge):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d) for _ in range(2)])
        if merge:
            self.downsample = nn.Module()
            self.downsample.reduction = nn.Linear(4 * d, 2 * d, bias=False)


class _TinySwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, 8, 2, 2)
        self.stages = nn.ModuleList([_Stage(8, True), _Stage(16, False)])
        self.head = nn.Linear(16, 10)


def test_prune_with_dimap_allocation_gives_the_score_masks():
    torch.manual_seed(0)
    model = _TinySwin()
    with torch.no_grad():
        model.stages[1].blocks[1].mlp.fc1.weight.mul_(50)  # a loud layer: global magnitude would spare it
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("stages.")
               and isinstance(m, nn.Linear)}
    want = dimap_masks(weights, 0.5)
    report = prune(model, "magnitude", 0.5, allocation="dimap", show_progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    mods = dict(model.named_modules())
    for n, keep in want.items():
        assert torch.equal(mods[n].weight != 0, keep), n
    assert bool((model.stages[0].downsample.reduction.weight == weights["stages.0.downsample.reduction"]).all())
