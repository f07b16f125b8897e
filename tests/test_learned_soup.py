"""Learned soup (Wortsman et al. 2022, appendix): per-tensor mixing weights trained through the
shared evaluator; planted per-layer mixtures are recovered."""
import pytest
import torch
from torch import nn

from weightlab.engine.evaluators import ClassificationEvaluator
from weightlab.errors import ConfigError
from weightlab.merge.soup import LearnedSoupConfig, learned_soup, uniform_soup
from weightlab.registry import get_method


pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _planted():
    """Teacher labels; ingredient A holds the teacher's first layer, B its second, C neither."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = _net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3)  # confident teacher: clear margins
    x = torch.randn(1024, 6, generator=g)
    y = teacher(x).argmax(-1)
    t = teacher.state_dict()

    def noise():
        return {k: torch.randn(v.shape, generator=g) * v.std() for k, v in t.items()}

    a = {**noise(), "0.weight": t["0.weight"], "0.bias": t["0.bias"]}
    b = {**noise(), "2.weight": t["2.weight"], "2.bias": t["2.bias"]}
    return [a, b, noise()], ClassificationEvaluator(x[:512], y[:512]), ClassificationEvaluator(x[512:], y[512:])


def _acc(sd, ev):
    m = _net()
    m.load_state_dict(sd)
    return ev(m)["accuracy"]


def test_registered_with_the_paper_defaults():
    spec = get_method("merge", "learned-soup")
    assert spec.fn is learned_soup and spec.kind == "merge-model"
    d = spec.defaults()
    assert (d["lr"], d["weight_decay"], d["epochs"], d["batch_size"]) == (0.05, 0.0, 5, 256)


def test_per_layer_weights_recover_the_planted_mixture():
    ings, held, test = _planted()
    res = learned_soup(ings, _net(), held, steps=200, batch_size=512)
    assert res.rows == ["0.weight", "0.bias", "2.weight", "2.bias"]
    w = dict(zip(res.rows, res.weights))
    for k in ("0.weight", "0.bias"):
        assert w[k][0] > 0.9, (k, w[k])
    for k in ("2.weight", "2.bias"):
        assert w[k][1] > 0.9, (k, w[k])
    torch.testing.assert_close(res.weights.sum(1), torch.ones(4))
    # the soup is the weighted sum the weights say, in the ingredients' dtype
    want = sum(float(w["0.weight"][i]) * ings[i]["0.weight"].double() for i in range(3))
    torch.testing.assert_close(res.state_dict["0.weight"], want.float())
    soup_acc = _acc(res.state_dict, test)
    assert soup_acc > 0.95
    assert max(_acc(sd, test) for sd in ings) < 0.5 and _acc(uniform_soup(ings), test) < 0.5
    assert res.losses[-1] < res.losses[0] and res.scale > 1  # the logit scale sharpens the confident soup


def test_one_row_cannot_pick_per_layer():
    ings, held, test = _planted()
    res = learned_soup(ings, _net(), held, LearnedSoupConfig(by_layer=False, steps=200, batch_size=512))
    assert res.rows == ["*"] and res.weights.shape == (1, 3)
    assert _acc(res.state_dict, test) < 0.8


def test_single_ingredient_is_returned_exactly_and_errors_name_the_tensor():
    ings, held, _ = _planted()
    res = learned_soup(ings[:1], _net(), held, steps=3)
    for k, v in ings[0].items():
        assert torch.equal(res.state_dict[k], v)
    bad = {**ings[1], "2.weight": torch.zeros(4, 15)}
    with pytest.raises(ConfigError, match="2.weight"):
        learned_soup([ings[0], bad], _net(), held, steps=1)
    with pytest.raises(ConfigError, match="held-out"):
        learned_soup(ings, _net())


def test_learned_soup_from_a_merge_config(tmp_path):
    import weightlab as wl
    from weightlab.cli import main

    assert main(["zoo", "export", "-o", str(tmp_path / "z")]) == 0
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(f"""method: learned-soup
models: [{tmp_path}/z/ft0, {tmp_path}/z/ft3]
scorer: {{type: accuracy, dataset: digits}}
params: {{steps: 15}}
""")
    res = wl.merge.run_merge(wl.merge.api.load_merge_config(cfg), tmp_path / "soup")
    rep = res.report
    assert len(rep["rows"]) == 6 and len(rep["weights"][0]) == 2 and rep["loss_end"] < rep["loss_start"]
    saved = wl.open_checkpoint(tmp_path / "soup").state_dict()
    fts = [wl.open_checkpoint(tmp_path / "z" / f).state_dict() for f in ("ft0", "ft3")]
    for name, w in zip(rep["rows"], rep["weights"]):
        torch.testing.assert_close(saved[name], w[0] * fts[0][name] + w[1] * fts[1][name], rtol=1e-5, atol=1e-6)
    prov = wl.Provenance.from_metadata(wl.open_checkpoint(tmp_path / "soup").metadata)
    assert prov.method == "merge/learned-soup"
    cfg.write_text(cfg.read_text().replace("scorer: {type: accuracy, dataset: digits}\n", ""))
    with pytest.raises(ConfigError, match="held-out data"):
        wl.merge.run_merge(wl.merge.api.load_merge_config(cfg), tmp_path / "soup2")
