import pytest
import torch
from torch import nn

from weightlab.align import permuted_copy, spec_from_module
from weightlab.align.atlas import AtlasConfig, Composition, atlas
from weightlab.align.pleas import fold_batchnorm, pleas, ratio_for_budget
from weightlab.engine.evaluators import ClassificationEvaluator
from weightlab.zoo import MLP, SmallCNN


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_random(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.num_features, generator=g))
    return m.eval()


@pytest.mark.parametrize("make,nin", [(lambda: MLP(20, (24, 16), 5), 20), (lambda: _bn_random(SmallCNN()), 64)])
def test_pleas_ratio0_on_permuted_copy_is_exact(make, nin):
    torch.manual_seed(0)
    a = make()
    s = spec_from_module(a)
    b = permuted_copy(a, s, s.random(2))
    x = torch.randn(300, nin)
    res = pleas(a, b, x, ratio=0.0, ridge=1e-10)
    assert max(res.layer_error.values()) < 1e-9
    assert res.widths == s.sizes  # full merge: the size of one model
    torch.testing.assert_close(res.model(x[:50]), a(x[:50]), rtol=1e-4, atol=1e-4)
    if isinstance(a, MLP):  # activation matching found the planted permutation (random CNNs have dead twins)
        torch.testing.assert_close(permuted_copy(b, s, res.perms).state_dict(), a.state_dict())


def test_pleas_ratio1_reproduces_the_ensemble():
    torch.manual_seed(0)
    a, b = MLP(20, (24, 16), 5), MLP(20, (24, 16), 5)
    x = torch.randn(600, 20)
    res = pleas(a, b, x, ratio=1.0, ridge=1e-10)
    assert res.widths == {"body.0": 48, "body.2": 32}
    torch.testing.assert_close(res.model(x[:50]), (a(x[:50]) + b(x[:50])) / 2, rtol=1e-4, atol=1e-4)


def test_pleas_beats_permute_average_on_its_own_objective():
    """At r=0 the refit layer minimises the per-layer error that permute-and-average only guesses."""
    torch.manual_seed(0)
    a, b = MLP(20, (24, 16), 5), MLP(20, (24, 16), 5)
    x = torch.randn(800, 20)
    res = pleas(a, b, x, ratio=0.0)
    from weightlab.align.connect import interpolate

    avg = MLP(20, (24, 16), 5)
    avg.load_state_dict(interpolate(a.state_dict(), permuted_copy(b, spec_from_module(a), res.perms).state_dict(), 0.5))
    target = (a(x) + b(x)) / 2
    assert (res.model(x) - target).pow(2).mean() < (avg(x) - target).pow(2).mean()
    r = ratio_for_budget(a, 1.5)
    half = pleas(a, b, x, ratio=r)
    assert 1.4 < half.params / sum(p.numel() for p in a.parameters()) < 1.55


def test_fold_batchnorm_keeps_outputs():
    m = _bn_random(SmallCNN())
    x = torch.randn(8, 64)
    torch.testing.assert_close(fold_batchnorm(m)(x), m(x), rtol=1e-5, atol=1e-5)


def _tasks(seed=0):
    torch.manual_seed(seed)
    base = MLP(6, (8,), 3)
    taus = [{k: torch.randn_like(v) * 0.5 for k, v in base.state_dict().items()} for _ in range(2)]
    fts = [{k: base.state_dict()[k] + t[k] for k in t} for t in taus]
    return base, fts


def test_atlas_one_hot_coefficients_give_each_finetune_exactly():
    base, fts = _tasks()
    comp = Composition(base, base.state_dict(), fts)
    for i, ft in enumerate(fts):
        with torch.no_grad():
            comp.coef.zero_()
            comp.coef[i] = 1
        sd = comp.merged_state_dict()
        for k in ft:
            assert torch.equal(sd[k], ft[k]), k
        x = torch.randn(4, 6)
        ref = MLP(6, (8,), 3)
        ref.load_state_dict(ft)
        torch.testing.assert_close(comp(x), ref(x))
    with torch.no_grad():
        comp.coef.zero_()
    assert all(torch.equal(comp.merged_state_dict()[k], v) for k, v in base.state_dict().items())


class _Teacher:
    """Random inputs with a fixed teacher's outputs: loss = MSE to the teacher."""

    def __init__(self, teacher, n=512):
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.t = teacher(self.x)
        self.y = self.t

    def batches(self, bs, gen):
        while True:
            idx = torch.randperm(len(self.x), generator=gen)
            for s in range(0, len(idx), bs):
                yield self.x[idx[s:s + bs]], self.t[idx[s:s + bs]]

    def loss(self, m, batch):
        return (m(batch[0]) - batch[1]).pow(2).mean()


def test_atlas_recovers_planted_blockwise_coefficients():
    base, fts = _tasks(1)
    planted = torch.tensor([[0.7, 0.1, 0.4, -0.3], [0.2, 0.9, -0.5, 0.6]])  # tasks x (w1, b1, w2, b2)
    teacher = Composition(base, base.state_dict(), fts)
    with torch.no_grad():
        teacher.coef.copy_(planted[..., None])
    target = MLP(6, (8,), 3)
    target.load_state_dict(teacher.merged_state_dict())
    data = _Teacher(target)
    before = [p.detach().clone() for p in base.parameters()]
    res = atlas(base, fts, data, AtlasConfig(lr=0.05, weight_decay=0.0, steps=200, batch_size=512))
    assert res.coefficients.shape == (2, 4, 1)
    torch.testing.assert_close(res.coefficients[..., 0], planted, atol=1e-2, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters()))  # only the coefficients train
    assert all(p.requires_grad for p in base.parameters())


def test_atlas_supervised_and_entropy_lower_their_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    base, fts = _tasks(2)
    ev = ClassificationEvaluator(x, y)
    for objective in ("supervised", "entropy"):
        res = atlas(base, fts, ev, objective=objective, lr=0.05, steps=100, batch_size=64, partitions=3)
        assert res.coefficients.shape == (2, 4, 3)
        assert sum(res.losses[-10:]) < sum(res.losses[:10])
