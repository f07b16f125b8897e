"""Adapt II, compositional methods: orthogonal adaptation, ConTraCon, MixtureGrowth (compander: test_compander.py)."""
import copy
import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.adapt.orthogonal import concept_basis, orthogonal_sum, random_orthogonal
from weightlab.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


def mlp(seed=0, d_in=32, d_h=24, d_out=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_h), nn.Tanh(), nn.Linear(d_h, d_out))


def train(model, x, y, steps=60, lr=3e-2):
    opt = torch.optim.Adam(adapt.trainable_parameters(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


# -- orthogonal adaptation ----------------------------------------------------------------------
def test_random_orthogonal_is_orthogonal_and_seeded():
    O = random_orthogonal(20, 3)
    assert torch.allclose(O @ O.t(), torch.eye(20), atol=1e-5)
    assert torch.equal(O, random_orthogonal(20, 3)) and not torch.equal(O, random_orthogonal(20, 4))


def test_orthogonal_init_grad_count():
    m = mlp()
    x = torch.randn(8, 32)
    y0 = m(x)
    adapt.attach(m, "orthogonal", targets=["0", "2"], r=4, concept=1)
    assert torch.equal(m(x), y0)  # B = 0
    # trainable = r*out per layer: only B trains, the basis slice is a frozen buffer
    assert adapt.count_trainable(m) == 4 * 24 + 4 * 16
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"0.adapter.lora_B", "2.adapter.lora_B"}
    A0 = m[0].adapter.lora_A.clone()
    W0 = m[0].base_layer.weight.clone()
    opt = adapt.make_optimizer(m, 1e-2)
    m(x).square().sum().backward()
    opt.step()
    assert m[0].adapter.lora_B.grad is not None and m[0].adapter.lora_B.abs().sum() > 0
    assert torch.equal(m[0].adapter.lora_A, A0) and torch.equal(m[0].base_layer.weight, W0)


def test_orthogonal_subspaces_disjoint():
    As = [concept_basis(32, 4, i, seed=7) for i in range(8)]
    for i in range(8):
        assert torch.allclose(As[i] @ As[i].t(), torch.eye(4), atol=1e-5)
        for j in range(i + 1, 8):
            assert (As[i] @ As[j].t()).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="disjoint concepts fit"):
        concept_basis(32, 4, 8, seed=7)
    # the Gaussian variant is only nearly orthogonal: it must not pass as exact
    G = [concept_basis(32, 4, i, seed=7, basis="gaussian") for i in range(2)]
    assert (G[0] @ G[1].t()).abs().max() > 1e-3


def _concept(base, concept, x, y, tmp, **cfg):
    m = copy.deepcopy(base)
    adapt.attach(m, "orthogonal", targets=["0", "2"], r=4, concept=concept, seed=5, **cfg)
    train(m, x, y)
    adapt.save(m, tmp / f"c{concept}")
    return m


def test_orthogonal_sum_acts_as_each_concept_on_its_subspace(tmp_path):
    base = mlp(1)
    single = nn.Sequential(nn.Linear(32, 16))
    torch.manual_seed(2)
    adapters, zs = [], []
    for c in (0, 3):
        A = concept_basis(32, 4, c, seed=5)
        z = torch.randn(64, 4)
        x = z @ A  # inputs inside concept c's subspace
        m = copy.deepcopy(single)
        adapt.attach(m, "orthogonal", targets=["0"], r=4, concept=c, seed=5, alpha=16)
        train(m, x, torch.randn(64, 16))
        adapt.save(m, tmp_path / f"c{c}")
        adapters.append(m)
        zs.append(x)
    orthogonal_sum([tmp_path / "c0", tmp_path / "c3"], tmp_path / "sum")
    merged = adapt.load(copy.deepcopy(single), tmp_path / "sum")
    assert merged._weightlab_adapter["config"]["concepts"] == [0, 3]
    for m, x in zip(adapters, zs):
        assert torch.allclose(merged(x), m(x), atol=1e-5)
    # the merged weight is W0 + the sum of the concept deltas (and matches the summed adapter forward)
    W = single[0].weight.detach()
    dW = sum(a[0].merged_weight() - W for a in adapters)
    assert torch.allclose(merged[0].merged_weight(), W + dW, atol=1e-6)
    x = torch.randn(8, 32)
    y_ad = merged(x)
    adapt.fold(merged)
    assert torch.allclose(merged(x), y_ad, atol=1e-5)
    del base


def test_plain_lora_sum_has_crosstalk_orthogonal_not():
    """Control: the same planted task with LoRA factors (random, not forced disjoint) interferes."""
    single = nn.Sequential(nn.Linear(32, 16))
    torch.manual_seed(2)
    errs = {}
    for method in ("lora", "orthogonal"):
        models, data = [], []
        for c in (0, 1):
            A = concept_basis(32, 4, c, seed=5)
            x = torch.randn(64, 4) @ A
            y = torch.randn(64, 16)
            m = copy.deepcopy(single)
            kw = dict(concept=c, seed=5) if method == "orthogonal" else dict(seed=c)
            adapt.attach(m, method, targets=["0"], r=4, alpha=16, **kw)
            train(m, x, y, steps=150)
            models.append(m)
            data.append((x, y))
        W = single[0].weight.detach()
        Wm = W + sum(m[0].merged_weight() - W for m in models)
        with torch.no_grad():
            errs[method] = max(float(nn.functional.mse_loss(x @ Wm.t() + single[0].bias, y) -
                                     nn.functional.mse_loss(m(x), y)) for m, (x, y) in zip(models, data))
    assert errs["orthogonal"] < 1e-6 < 1e-2 < errs["lora"]


def test_orthogonal_sum_rejects_mixed_or_overlapping(tmp_path):
    base = mlp()
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    _concept(base, 0, x, y, tmp_path)
    _concept(base, 1, x, y, tmp_path)
    m = copy.deepcopy(base)
    adapt.attach(m, "orthogonal", targets=["0", "2"], r=4, concept=1, seed=5)
    adapt.save(m, tmp_path / "dup")
    with pytest.raises(ConfigError, match="concept id 1"):
        orthogonal_sum([tmp_path / "c0", tmp_path / "c1", tmp_path / "dup"], tmp_path / "bad")
    m = copy.deepcopy(base)
    adapt.attach(m, "lora", targets=["0", "2"], r=4)
    adapt.save(m, tmp_path / "lora")
    with pytest.raises(ConfigError, match="not 'orthogonal'"):
        orthogonal_sum([tmp_path / "c0", tmp_path / "lora"], tmp_path / "bad")
    m = copy.deepcopy(base)
    adapt.attach(m, "orthogonal", targets=["0", "2"], r=4, concept=2, seed=6)
    adapt.save(m, tmp_path / "seed6")
    with pytest.raises(ConfigError, match="share one basis"):
        orthogonal_sum([tmp_path / "c0", tmp_path / "seed6"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_orthogonal_sum_cli(tmp_path, capsys):
    from weightlab.cli import main

    base = mlp()
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    ms = [_concept(base, c, x, y, tmp_path) for c in (0, 1)]
    assert main(["adapter", "sum", str(tmp_path / "c0"), str(tmp_path / "c1"), "-o", str(tmp_path / "sum")]) == 0
    assert "concepts [0, 1], rank 8" in capsys.readouterr().out
    merged = adapt.load(copy.deepcopy(base), tmp_path / "sum")
    W = base[0].weight.detach()
    want = W + sum(m[0].merged_weight() - W for m in ms)
    assert torch.allclose(merged[0].merged_weight(), want, atol=1e-6)
    assert main(["adapter", "sum", str(tmp_path / "c0"), "-o", str(tmp_path / "one")]) == 1
    assert "at least two" in capsys.readouterr().err


# -- ConTraCon --------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    """Tokens -> one 2-head self-attention block (q/k/v/o) -> mean pool -> classifier."""

    def __init__(self, d_tok=8, d=16, classes=3):
        super().__init__()
        self.embed = nn.Linear(d_tok, d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d)
        self.classifier = nn.Linear(d, classes)
        self.d_tok = d_tok

    def forward(self, x):
        h = self.embed(x.reshape(len(x), -1, self.d_tok))
        B, T, d = h.shape
        q, k, v = (p(h).reshape(B, T, 2, d // 2).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // 2) ** 0.5, -1) @ v
        h = h + self.o_proj(a.transpose(1, 2).reshape(B, T, d))
        return self.classifier(h.mean(1))


def test_contracon_identity_kernel_and_counts():
    m = TinyTransformer()
    x = torch.randn(5, 32)
    y0 = m(x)
    adapt.attach(m, "contracon", targets=["q_proj", "k_proj", "v_proj"], head_dim=8, kernel=3, init="identity")
    assert torch.equal(m(x), y0)  # delta kernel, zero bias, closed gate: W exactly
    m = TinyTransformer()
    adapt.attach(m, "contracon", targets=["q_proj", "k_proj", "v_proj"], head_dim=8, kernel=5, seed=0)
    assert adapt.count_trainable(m) == 3 * (2 * (25 + 1) + 2)  # H(k^2+1) + H per projection
    assert not torch.allclose(m(x), y0)  # the paper's start (random conv, open gate) is not the identity
    W = m.q_proj.base_layer.weight.detach().clone()
    m(x).square().sum().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == {f"{p}.adapter.{t}" for p in ("q_proj", "k_proj", "v_proj") for t in ("kernels", "kbias", "gate")}
    # hand-computed re-weighting of head 1 of q: conv of its 8x16 row block + sigmoid(g) * block
    ad = m.q_proj.adapter
    blk = W[8:16]
    conv = nn.functional.conv2d(blk[None, None], ad.kernels[1:2], ad.kbias[1:2], padding=2)[0, 0]
    want = conv + torch.sigmoid(ad.gate[1]) * blk
    assert torch.allclose(m.q_proj.merged_weight()[8:16], want.detach(), atol=1e-6)
    y_ad = m(x).detach()
    adapt.fold(m)
    assert torch.allclose(m(x), y_ad, atol=1e-5)
    with pytest.raises(ConfigError, match="into heads"):
        adapt.attach(TinyTransformer(), "contracon", targets=["q_proj"], head_dim=5)


def _task_data(task, n, g):
    """Task t's classes differ only on features [4t, 4t+4) of every token; the other features are low noise."""
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.1 * torch.randn(n, 4, 8, generator=g)
    means = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(100 + task)) * 2
    x[:, :, 4 * task:4 * task + 4] += means[y]
    return x.reshape(n, 32), y


def _fit(params, model, x, y, x_other, steps=80):
    """Cross-entropy on the task, plus maximum entropy on the other task's inputs: the planted structure
    (each task's weights confident on its own inputs only) that entropy-based identification must find."""
    from weightlab.adapt.contracon import entropy

    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) - entropy(model(x_other)).mean()).backward()
        opt.step()


def test_contracon_tasks_identify_planted_and_keep_old_tasks_exact():
    from weightlab.adapt.contracon import ContraconTasks

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    m = TinyTransformer()
    x0, y0 = _task_data(0, 128, g)
    x1, y1 = _task_data(1, 128, g)
    _fit(list(m.parameters()), m, x0, y0, x1)  # task 0 trains the whole model
    tx0, ty0 = _task_data(0, 128, g)
    ref0 = m(tx0).detach()
    tasks = ContraconTasks(m, head="classifier", head_dim=8, kernel=3, seed=0)
    assert torch.equal(m(tx0), ref0)
    assert tasks.new_task() == 1
    nn.init.zeros_(m.classifier.weight)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if "adapter" not in n and "classifier" not in n}
    _fit(tasks.trainable_parameters(), m, x1, y1, x0)
    assert tasks.snapshot() == 1
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    tasks.use(0)
    assert torch.equal(m(tx0), ref0)  # task 0 comes back bit-exact after training task 1
    tx1, ty1 = _task_data(1, 128, g)
    ids = tasks.identify(torch.cat([tx0, tx1]))
    truth = torch.cat([torch.zeros(128), torch.ones(128)]).long()
    assert (ids == truth).float().mean() > 0.9
    # per-task prediction through identification is accurate on both tasks
    t, logits = tasks.predict(torch.cat([tx0, tx1]))
    pred = torch.stack(logits).argmax(1)
    assert (pred == torch.cat([ty0, ty1])).float().mean() > 0.85
    # control: a shuffled snapshot order follows the weights, not the position
    tasks.snapshots.reverse()
    assert (tasks.identify(torch.cat([tx0, tx1])) == 1 - truth).float().mean() > 0.9


# -- MixtureGrowth ------------------------------------------------------------------------------------
def test_mixture_blocks_are_template_combinations_and_count():
    from weightlab.adapt.mixturegrowth import MixtureLinear

    torch.manual_seed(0)
    m = MixtureLinear(5, 4, grid=2, templates=3)
    W = m.weight().detach()
    T, C = m.templates.detach(), m.coefs.detach()
    assert torch.allclose(W[:4, :5], C[0, 0] * T[0, 0] + C[0, 1] * T[0, 1] + C[0, 2] * T[0, 2], atol=1e-6)
    assert torch.allclose(W[4:, 5:], C[1, 0] * T[1, 0] + C[1, 1] * T[1, 1] + C[1, 2] * T[1, 2], atol=1e-6)
    assert torch.equal(W[:4, 5:], torch.zeros(4, 5)) and torch.equal(W[4:, :5], torch.zeros(4, 5))
    assert torch.allclose(C.t() @ C, torch.eye(3), atol=1e-5)  # orthogonal_ on a tall (4 x 3) matrix
    # templates + coefficients + bias
    assert sum(p.numel() for p in m.parameters()) == 2 * 3 * 4 * 5 + 4 * 3 + 8


def test_mixture_seed_members_independent_and_zero_growth_exact():
    from weightlab.adapt.mixturegrowth import MixtureMLP, grow

    torch.manual_seed(0)
    net = MixtureMLP(12, hidden=16, depth=3, num_classes=5)
    x = torch.randn(7, 12)
    full = net(x)
    parts = [net.member_forward(x, i) for i in range(2)]
    assert torch.allclose(full, parts[0] + parts[1] - net.head.bias, atol=1e-5)  # block-diagonal = ensemble
    net.member_forward(x, 0).sum().backward()
    for m in net.mids:  # member 0 touches only set 0 and its own coefficients
        assert m.templates.grad[1].abs().sum() == 0 and m.templates.grad[0].abs().sum() > 0
        assert m.coefs.grad[1:].abs().sum() == 0
    diag = [(m.weight()[:8, :8].detach().clone(), m.weight()[8:, 8:].detach().clone()) for m in net.mids]
    grow(net, how="zero")
    for m, (d0, d1) in zip(net.mids, diag):
        W = m.weight().detach()
        assert torch.equal(W[:8, :8], d0) and torch.equal(W[8:, 8:], d1)
        assert torch.equal(W[:8, 8:], torch.zeros(8, 8)) and torch.equal(W[8:, :8], torch.zeros(8, 8))
    assert torch.equal(net(x), full)
    assert torch.allclose(net.to_mlp()(x), full, atol=1e-5)
    with pytest.raises(ConfigError, match="already grown"):
        grow(net)


def test_mixture_orthogonal_growth_rule():
    from weightlab.adapt.mixturegrowth import MixtureMLP, grow

    torch.manual_seed(1)
    net = MixtureMLP(12, hidden=16, depth=2, num_classes=5)
    m = net.mids[0]
    C0 = m.coefs.detach().clone()
    diag = m.weight()[:8, :8].detach().clone()
    grow(net, how="orthogonal", eta=2.0)
    C = m.coefs.detach()
    assert torch.equal(C[:3], C0[:3])  # seeds kept; the first grown member keeps its init (reference)
    _, _, Vh = torch.linalg.svd(C0[:3].double())
    assert torch.allclose(C[3].double().abs(), 2.0 * Vh[-1].abs(), atol=1e-6)
    # it is the direction the earlier members' coefficients cover least: |C[:3] c3| / eta = smallest singular value
    assert abs(float((C0[:3].double() @ C[3].double()).norm()) / 2.0
               - float(torch.linalg.svdvals(C0[:3].double())[-1])) < 1e-5
    W = m.weight().detach()
    assert torch.equal(W[:8, :8], diag)
    T = m.templates.detach()
    assert torch.allclose(W[:8, 8:], C[2, 0] * T[0, 0] + C[2, 1] * T[0, 1], atol=1e-6)  # block (0,1): set 0
    assert torch.allclose(W[8:, :8], C[3, 0] * T[1, 0] + C[3, 1] * T[1, 1], atol=1e-6)  # block (1,0): set 1
    with pytest.raises(ConfigError, match="not an adapter"):
        adapt.attach(mlp(), "mixturegrowth")


@pytest.mark.slow
def test_mixturegrowth_on_zoo_digits():
    """Seed two half-width members, grow, keep training: the grown net beats the seed ensemble's start."""
    from weightlab import zoo
    from weightlab.adapt.mixturegrowth import MixtureMLP, grow

    ds = zoo.digits()
    torch.manual_seed(0)
    net = MixtureMLP(64, hidden=64, depth=2, num_classes=10)

    def run(loss_fn, epochs):
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(len(ds.y_train), generator=g)
            for s in range(0, len(perm), 64):
                i = perm[s:s + 64]
                opt.zero_grad()
                loss_fn(ds.x_train[i], ds.y_train[i]).backward()
                opt.step()

    def acc(f):
        with torch.no_grad():
            return float((f(ds.x_test).argmax(1) == ds.y_test).float().mean())

    run(net.seed_loss, 8)
    seed_acc = [acc(lambda x: net.member_forward(x, i)) for i in range(2)]
    grow(net)
    run(lambda x, y: nn.functional.cross_entropy(net(x), y), 8)
    grown_acc = acc(net)
    assert min(seed_acc) > 0.85
    assert grown_acc >= max(seed_acc) - 0.01
