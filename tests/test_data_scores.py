"""Per-sample scores: EL2N, GraNd, forgetting (issue 9's proofs; prototypes: test_prototype.py)."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import weightlab as wl
from weightlab import data as D
from weightlab.tensor.sample_scores import auroc, el2n, rank_descending


@pytest.fixture(scope="module")
def noisy_digits():
    d = D.load_scoring_data("digits")
    y, mask = D.inject_label_noise(d.y, 0.1, d.num_classes, seed=0)
    return d.with_labels(y), mask, d.y


# ----------------------------------------------------------------------------- EL2N

def test_el2n_formula_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 1])
    # p = (.5, .5) vs (1, 0): sqrt(.25 + .25); p = (.75, .25) vs (0, 1): sqrt(.75^2 * 2)
    assert torch.allclose(el2n(logits, y), torch.tensor([math.sqrt(0.5), 0.75 * math.sqrt(2)], dtype=torch.float64))


def test_el2n_mislabeled_far_above_clean(noisy_digits):
    d, noisy, _ = noisy_digits
    tab = D.score_dataset("el2n", d, runs=2, epochs=2)
    s = tab.scores
    assert s[noisy].mean() > 4 * s[~noisy].mean()  # about 1.2 vs 0.25
    assert auroc(s, noisy) > 0.97
    # the score uses the given labels: with the true labels the flipped samples look easy
    clean = D.score_dataset("el2n", d.with_labels(noisy_digits[2]), runs=1, epochs=2).scores
    assert clean[noisy].mean() < 0.5 * s[noisy].mean()


def test_el2n_is_averaged_over_runs(noisy_digits):
    d, _, _ = noisy_digits
    cfg = D.El2nConfig(runs=2, epochs=1)
    both = D.score_dataset("el2n", d, runs=2, epochs=1).scores
    from weightlab.data._train import train_run

    singles = [D.el2n_scores(train_run(d, cfg, r), d.x, d.y) for r in range(2)]
    assert torch.allclose(both, (singles[0] + singles[1]) / 2)
    assert not torch.allclose(singles[0], singles[1])  # runs really differ (seed + r)


# ----------------------------------------------------------------------------- GraNd

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.b = nn.Linear(7, 3)
        self.frozen = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.bn(self.a(x)))) + self.frozen(x)


def test_grand_equals_per_sample_loop():
    torch.manual_seed(0)
    net = _Net()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    net.train()  # grand_scores must score in eval mode and restore the mode
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    fast = D.grand_scores(net, x, y, chunk_size=8)
    assert net.training
    net.eval()
    params = [p for p in net.parameters() if p.requires_grad]
    loop = []
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), params)
        loop.append(torch.sqrt(sum(t.double().pow(2).sum() for t in g)))
    assert torch.allclose(fast, torch.stack(loop), rtol=1e-5, atol=1e-7)


def test_grand_linear_softmax_closed_form():
    torch.manual_seed(1)
    lin = nn.Linear(6, 4)
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    p = torch.softmax(lin(x), 1).detach().double()
    expected = torch.linalg.vector_norm(p - F.one_hot(y, 4).double(), dim=1) * torch.sqrt(
        x.double().pow(2).sum(1) + 1)
    assert torch.allclose(D.grand_scores(lin, x, y), expected, rtol=1e-5)


def test_grand_is_vectorised_not_a_loop():
    lin = nn.Linear(6, 4)
    calls = []
    lin.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    D.grand_scores(lin, torch.randn(100, 6), torch.randint(0, 4, (100,)), chunk_size=64)
    assert len(calls) == 2  # one batched call per chunk (64 + 36 samples), not 100


def test_grand_finds_noisy_labels(noisy_digits):
    d, noisy, _ = noisy_digits
    tab = D.score_dataset("grand", d, runs=2, epochs=2)
    assert auroc(tab.scores, noisy) > 0.95


# ----------------------------------------------------------------------------- forgetting

def test_forgetting_scripted_sequence():
    tr = D.ForgettingTracker(5)
    script = [  # (ids, correct) per presentation
        ([0, 1, 2, 3], [1, 0, 1, 0]),
        ([0, 1, 2, 3], [0, 0, 1, 1]),  # 0 forgets
        ([2, 0], [0, 1]),  # 2 forgets
        ([0, 3, 1], [0, 0, 0]),  # 0 and 3 forget
        ([2], [1]),
    ]
    for ids, ok in script:
        tr.update(torch.tensor(ids), torch.tensor(ok, dtype=torch.bool))
    assert tr.forgets.tolist() == [2, 0, 1, 1, 0]
    assert tr.never_learned.tolist() == [False, True, False, False, True]  # 4 was never even presented
    s = tr.scores()
    assert s[:4].tolist() == [2.0, math.inf, 1.0, 1.0] and math.isinf(s[4])
    assert tr.presentations.tolist() == [4, 3, 4, 3, 0]


def test_forgetting_first_presentation_is_no_event():
    tr = D.ForgettingTracker(2)
    tr.update(torch.tensor([0, 1]), torch.tensor([False, False]))
    assert tr.forgets.tolist() == [0, 0]


def test_forgetting_end_to_end(noisy_digits):
    d, noisy, _ = noisy_digits
    tab = D.score_dataset("forgetting", d, runs=1, epochs=8)
    assert "never_learned_runs" in tab.extra
    assert auroc(tab.scores, noisy) > 0.9  # flipped labels are forgotten often or never learned
    never = tab.extra["never_learned_runs"] > 0
    assert torch.isinf(tab.scores[never]).all() and torch.isfinite(tab.scores[~never]).all()


# ----------------------------------------------------------------------------- helpers

def test_auroc_and_rank():
    s = torch.tensor([0.1, 0.9, 0.5, math.inf, 0.5])
    pos = torch.tensor([False, True, False, True, True])
    # pairs (pos, neg): (0.9,.1) (0.9,.5) (inf,.1) (inf,.5) (.5,.1) (.5,.5 tie=.5) -> 5.5 / 6
    assert auroc(s, pos) == pytest.approx(5.5 / 6)
    assert auroc(torch.ones(5), pos) == 0.5
    assert math.isnan(auroc(s, torch.zeros(5, dtype=torch.bool)))
    assert rank_descending(s).tolist() == [5, 2, 3, 1, 4]


def test_label_noise_injection():
    y = torch.arange(10).repeat(10)
    noisy, mask = D.inject_label_noise(y, 0.2, 10, seed=5)
    assert int(mask.sum()) == 20 and bool((noisy[mask] != y[mask]).all()) and torch.equal(noisy[~mask], y[~mask])
    assert torch.equal(D.inject_label_noise(y, 0.2, 10, seed=5)[0], noisy)


def test_unknown_params_and_methods_are_config_errors(noisy_digits):
    d = noisy_digits[0]
    with pytest.raises(wl.ConfigError, match="runs"):
        D.score_dataset("prototype", d, runs=3)
    with pytest.raises(wl.ConfigError, match="not a per-sample score"):
        D.score_dataset("dro", d)
    with pytest.raises(wl.ConfigError, match="Did you mean 'grand'"):
        D.score_dataset("grnad", d)


def test_custom_model_fn(noisy_digits):
    d, noisy, _ = noisy_digits

    def linear(data, seed):
        torch.manual_seed(seed)
        return nn.Linear(data.num_features, data.num_classes)

    tab = D.score_dataset("grand", d, runs=1, epochs=3, model_fn=linear)
    assert auroc(tab.scores, noisy) > 0.9


def test_data_methods_registered():
    specs = {s.name: s for s in wl.list_methods("data")}
    assert set(specs) >= {"el2n", "grand", "forgetting", "prototype", "loss-reweight", "dro", "ldr-kl", "aldr-kl"}
    for s in specs.values():
        assert s.regime == wl.Regime.WHOLE_MODEL and s.kind in ("score", "reweighter", "loss")
    assert specs["el2n"].kind == "score" and specs["dro"].kind == "reweighter" and specs["ldr-kl"].kind == "loss"
    assert specs["loss-reweight"].defaults()["temperature"] == 0.4
    assert specs["ldr-kl"].defaults() == {"lambda": 10.0, "margin": 0.1, "normalize": "softplus", "reduction": "mean"}
