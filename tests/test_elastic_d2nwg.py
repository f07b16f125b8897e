"""D2NWG: vectorization, the stacked zoo training, the diffusion maths, the set encoder, a tiny generator trained
through the CLI (VAE vs a trivial baseline, seeded generation, save/load), generation CLI and its errors."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from weightlab.cli import main
from weightlab.elastic.d2nwg import load_generator, train_d2nwg
from weightlab.elastic.d2nwg_generate import load_mlp, write_model
from weightlab.elastic.d2nwg_nets import Denoiser, Schedule, SetEncoder, sample_ddim, sample_ddpm
from weightlab.elastic.d2nwg_zoo import (ConditionPool, Layout, accuracies, forward, init_vectors, make_task,
                                         train_vectors, unvectorize, vectorize)
from weightlab.zoo import MLP

LAY = Layout(64, (16,), 5)
TINY = ["-p", "train_tasks=8", "-p", "models_per_task=3", "-p", "heldout_tasks=4", "-p", "vae_steps=300",
        "-p", "diffusion_steps=300", "-p", "timesteps=100", "-p", "zoo_steps=100"]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest.py)


def test_vectorize_roundtrip_logits_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = MLP(64, (16,), 5).eval()
    v = vectorize(m.state_dict(), LAY)
    assert v.shape == (LAY.numel,) == (64 * 16 + 16 + 16 * 5 + 5,)
    back = unvectorize(v, LAY)
    assert all(torch.equal(back[k], m.state_dict()[k]) for k in back)
    x = torch.randn(7, 64)
    assert torch.allclose(forward(v[None], x, LAY)[0], m(x), atol=1e-6)
    write_model(v, LAY, tmp_path / "m", details={"dataset": "t"})
    assert torch.equal(load_mlp(tmp_path / "m")(x), m(x))
    with pytest.raises(Exception, match="shape"):
        vectorize({**m.state_dict(), "body.0.weight": torch.zeros(3, 3)}, LAY)


def test_stacked_training_is_per_model_adam():
    """Model 0 trained in a stack of 2 equals an nn.Module + torch Adam run on the same minibatches."""
    t0, t1 = make_task("digits", (0, 1, 2, 3, 4)), make_task("digits", (5, 6, 7, 8, 9))
    inits = init_vectors(LAY, 2, torch.Generator().manual_seed(1))
    trained, _ = train_vectors(inits, [t0, t1], LAY, steps=20, lr=1e-2, batch_size=16,
                               gen=torch.Generator().manual_seed(5))
    ref = MLP(64, (16,), 5)
    ref.load_state_dict(unvectorize(inits[0], LAY))
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    g, n = torch.Generator().manual_seed(5), torch.tensor([len(t0.y_fit), len(t1.y_fit)])
    for _ in range(20):
        idx = (torch.rand(2, 16, generator=g) * n.unsqueeze(1)).long()[0]
        loss = F.cross_entropy(ref(t0.x_fit[idx]), t0.y_fit[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(trained[0], vectorize(ref.state_dict(), LAY), atol=1e-5)
    assert not torch.allclose(trained[0], inits[0])
    acc = accuracies(trained, [t0, t1], LAY)
    assert (acc > 0.8).all()


def test_schedule_and_q_sample_statistics():
    s = Schedule(1024, 1.5e-3, 1.55e-2)
    assert math.isclose(float(s.betas[0]), 1.5e-3, rel_tol=1e-9) and math.isclose(float(s.betas[-1]), 1.55e-2,
                                                                                    rel_tol=1e-9)
    z0 = torch.tensor([[1.5, -2.0]]).expand(20000, 2)
    t = torch.full((20000,), 300, dtype=torch.long)
    zt = s.q_sample(z0, t, torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)))
    a = float(s.alphas_cumprod[300])
    assert torch.allclose(zt.mean(0), math.sqrt(a) * z0[0], atol=0.03)
    assert torch.allclose(zt.var(0), torch.full((2,), 1 - a), rtol=0.05)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_denoiser_recovers_the_point(sampler):
    s = Schedule(200)
    z_star = torch.tensor([0.7, -1.3, 2.0])
    a = s.alphas_cumprod

    def eps(z, t):  # the exact noise for a data set holding only z_star
        at = a[t].float().unsqueeze(1)
        return (z - at.sqrt() * z_star) / (1 - at).sqrt()

    gen = torch.Generator().manual_seed(0)
    out = sample_ddpm(eps, s, (4, 3), gen) if sampler == "ddpm" else sample_ddim(eps, s, (4, 3), gen, steps=20)
    assert torch.allclose(out, z_star.expand(4, 3), atol=1e-3)


def test_set_encoder_sample_order_invariant_label_order_aware():
    torch.manual_seed(0)
    enc = SetEncoder(8, 3, hidden=16, out=6)
    x = torch.randn(2, 3, 5, 8)
    perm = x[:, :, torch.randperm(5)]
    assert torch.allclose(enc(x), enc(perm), atol=1e-5)
    assert not torch.allclose(enc(x), enc(x[:, [1, 0, 2]]), atol=1e-3)  # relabelling changes the output layer


def test_diffusion_loss_decreases_on_planted_problem():
    """Latents at +mu or -mu depending on which of two 'datasets' conditions them: the conditional model learns
    it (the loss falls) and samples for each condition land on their own point."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([2.0, -1.0, 0.5, 1.5])
    enc, den, s = SetEncoder(6, 2, hidden=16, out=8), Denoiser(4, 8, hidden=64, blocks=2), Schedule(100)
    opt = torch.optim.Adam(list(enc.parameters()) + list(den.parameters()), lr=2e-3)
    centers = torch.randn(2, 2, 6, generator=g) * 2  # per dataset, per class: a sample centre

    def cond(which):
        return centers[which].unsqueeze(2) + 0.3 * torch.randn(len(which), 2, 5, 6, generator=g)

    losses = []
    for _ in range(600):
        which = torch.randint(2, (64,), generator=g)
        z0 = torch.where(which.unsqueeze(1) == 0, mu, -mu)
        t, noise = torch.randint(100, (64,), generator=g), torch.randn(64, 4, generator=g)
        loss = F.mse_loss(den(s.q_sample(z0, t, noise), t, enc(cond(which))), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-100:]) / 100 < 0.6 * sum(losses[:50]) / 50
    with torch.no_grad():
        for which, target in ((0, mu), (1, -mu)):
            c = enc(cond(torch.full((16,), which)))
            z = sample_ddpm(lambda zz, tt: den(zz, tt, c), s, (16, 4), torch.Generator().manual_seed(1))
            d_own, d_other = (z - target).norm(dim=1), (z + target).norm(dim=1)
            assert (d_own < d_other).float().mean() >= 0.9


def test_condition_pool_draws_from_each_label():
    tasks = [make_task("digits", (0, 1, 2, 3, 4)), make_task("digits", (1, 3, 5, 7, 9))]
    pool = ConditionPool(tasks)
    c = pool.draw(torch.tensor([1, 0]), 4, torch.Generator().manual_seed(0))
    assert c.shape == (2, 5, 4, 64)
    for j in range(5):  # every drawn sample is a fit sample of that label of that task
        rows = tasks[1].x_fit[tasks[1].y_fit == j]
        assert all((rows == s).all(1).any() for s in c[0, j])


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    d = tmp_path_factory.mktemp("d2nwg")
    assert main(["elastic", "train", "d2nwg", "-o", str(d / "gen"), *TINY, "--json", str(d / "s.json")]) == 0
    return d / "gen"


def test_vae_beats_the_trivial_baseline(generator):
    g = load_generator(generator)
    rec = g.from_latent(g.to_latent(g.zoo))
    err = ((rec - g.zoo).norm(dim=1) / g.zoo.norm(dim=1)).median()
    base = ((g.zoo.mean(0) - g.zoo).norm(dim=1) / g.zoo.norm(dim=1)).median()
    assert err < 0.6 * base, (float(err), float(base))
    tasks = [make_task("digits", g.info["train_tasks"][i]) for i in g.zoo_task.tolist()]
    orig, dec = accuracies(g.zoo, tasks, g.layout, "val"), accuracies(rec, tasks, g.layout, "val")
    assert dec.mean() > orig.mean() - 0.05 and dec.mean() > 0.8


def test_generation_is_seeded_and_survives_save_load(generator, tmp_path):
    g = load_generator(generator)
    task = make_task("digits", g.info["train_tasks"][0])
    a = g.generate(g.condition(task, 3), n=2, seed=3)
    b = g.generate(g.condition(task, 3), n=2, seed=3)
    c = g.generate(g.condition(task, 4), n=2, seed=4)
    assert a.shape == (2, LAY.numel) and torch.equal(a, b) and not torch.equal(a, c)
    g.save(tmp_path / "again")
    assert torch.equal(load_generator(tmp_path / "again").generate(g.condition(task, 3), n=2, seed=3), a)
    d = g.generate(g.condition(task, 3), n=2, seed=3, sampler="ddim", ddim_steps=10)
    assert torch.isfinite(d).all() and not torch.equal(d, a)


def test_generate_cli_writes_a_checkpoint(generator, tmp_path, capsys):
    g = load_generator(generator)
    spec = "digits:" + ",".join(map(str, g.info["heldout_tasks"][0]))
    out = tmp_path / "m"
    assert main(["elastic", "generate", str(generator), "--dataset", spec, "--seed", "2", "--samples", "3",
                 "-o", str(out), "--json", "-"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task_in_zoo"] is False and info["samples"] == 3 and 0 <= info["chosen_sample"] < 3
    task = make_task("digits", g.info["heldout_tasks"][0])
    model = load_mlp(out)
    acc = (model(task.x_test).argmax(1) == task.y_test).float().mean().item()
    assert acc == pytest.approx(info["test_accuracy"], abs=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "weightlab-zoo-mlp" and cfg["classes"] == list(task.classes)
    # the same seed again gives the same weights
    assert main(["elastic", "generate", str(generator), "--dataset", spec, "--seed", "2", "--samples", "3",
                 "-o", str(tmp_path / "m2")]) == 0
    assert torch.equal(load_mlp(tmp_path / "m2").body[0].weight, model.body[0].weight)


def test_generate_from_a_dataset_file(generator, tmp_path):
    task = make_task("digits", (0, 2, 4, 6, 8))
    save_file({"x": task.x_fit.contiguous(), "y": task.y_fit.contiguous()}, str(tmp_path / "d.safetensors"))
    assert main(["elastic", "generate", str(generator), "--dataset", str(tmp_path / "d.safetensors"),
                 "-o", str(tmp_path / "m")]) == 0
    assert load_mlp(tmp_path / "m").body[-1].weight.shape == (5, 16)
    bad = task.x_fit.clone()
    bad[0, 0] = float("nan")
    save_file({"x": bad, "y": task.y_fit.contiguous()}, str(tmp_path / "bad.safetensors"))
    assert main(["elastic", "generate", str(generator), "--dataset", str(tmp_path / "bad.safetensors"),
                 "-o", str(tmp_path / "m3")]) == 1
    assert not (tmp_path / "m3").exists()


@pytest.mark.parametrize("args, msg", [
    (["--dataset", "digits:0,1,2"], "3 classes"),
    (["--dataset", "nope:1,2"], "NAME:c1,c2"),
    (["--dataset", "digits:0,1,2,3,11"], "classes 0..9"),
    (["--dataset", "digits:0,1,2,3,4", "--samples", "0"], "--samples"),
])
def test_generate_errors(generator, tmp_path, capsys, args, msg):
    assert main(["elastic", "generate", str(generator), *args, "-o", str(tmp_path / "m")]) == 1
    assert msg in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_generator_and_output_errors(generator, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["elastic", "generate", str(tmp_path / "empty"), "--dataset", "digits:0,1,2,3,4", "-o",
                 str(tmp_path / "m")]) == 1
    assert "not a D2NWG generator" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["elastic", "generate", str(generator), "--dataset", "digits:0,1,2,3,4", "-o",
                 str(tmp_path / "exists")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["elastic", "generate", str(generator), "--dataset", "digits:0,1,2,3,4", "-o",
                 str(generator / "inside")]) == 1
    assert "would write into or over the input" in capsys.readouterr().err
    assert main(["elastic", "train", "d2nwg", "-o", str(tmp_path / "g"), "-p", "way=11"]) == 1
    assert "only 0 distinct 11-class subsets" in capsys.readouterr().err
    assert main(["elastic", "train", "d2nwg", "-o", str(tmp_path / "g"), "-p", "vae_stepz=3"]) == 1
    assert "vae_stepz" in capsys.readouterr().err


@pytest.mark.slow
def test_generated_weights_far_above_chance_without_training():
    """A reduced default run: generated weights for held-in tasks come near the zoo, unseen tasks far above the
    20% of a random 5-way classifier."""
    g = train_d2nwg(train_tasks=40, models_per_task=3, heldout_tasks=6, vae_steps=1000, diffusion_steps=1500)
    for which, floor in (("train_tasks", 0.85), ("heldout_tasks", 0.5)):
        tasks = [make_task("digits", c) for c in g.info[which][:6]]
        conds = torch.stack([g.condition(t, 0) for t in tasks])
        acc = accuracies(g.generate(conds, n=1, seed=0), tasks, g.layout)
        assert acc.mean() > floor, (which, acc.tolist())
