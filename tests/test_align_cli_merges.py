"""weightlab pleas / weightlab atlas: outputs written as folders that weightlab connect and the
Python API load back."""
import json

import pytest
import torch

from weightlab.align.models import load_model
from weightlab.cli import main
from weightlab.engine.evaluators import ClassificationEvaluator
from weightlab.io.reader import open_checkpoint
from weightlab.zoo import load_dataset


pytestmark = pytest.mark.usefixtures("one_thread")


def _test_acc(model):
    d = load_dataset("digits")
    return round(ClassificationEvaluator(d.x_test, d.y_test)(model)["accuracy"], 4)


def test_pleas_of_a_model_with_itself_is_that_model(tmp_path, capsys):
    out = tmp_path / "self"
    assert main(["pleas", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed0", "--ratio", "0", "--samples", "400",
                 "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["widths"] == {"body.0": 64, "body.2": 64} and rep["size"] == 1.0
    assert max(rep["layer_error"].values()) < 1e-6
    assert rep["accuracy"]["merged"] == rep["accuracy"]["a"]
    a = load_model("zoo:digits-mlp-seed0").model
    merged = load_model(str(out)).model
    x = load_dataset("digits").x_test[:50]
    # the ridge (1e-4 of the mean Gram diagonal) is the only difference from an exact refit
    with torch.no_grad():
        assert float((merged(x) - a(x)).abs().max()) < 2e-3 * float(a(x).abs().max())
    assert torch.equal(merged(x).argmax(-1), a(x).argmax(-1))


def test_pleas_partial_merge_reloads_and_connects(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["pleas", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "--ratio", "0.5", "--samples", "500",
                 "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["widths"] == {"body.0": 96, "body.2": 96}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden"] == [96, 96] and cfg["model_type"] == "weightlab-zoo-classifier"
    assert sorted(json.loads((out / "permutations.json").read_text())) == ["body.0", "body.2"]
    reloaded = load_model(str(out)).model
    assert _test_acc(reloaded) == rep["accuracy"]["merged"]
    assert sum(p.numel() for p in reloaded.parameters()) == rep["params"]
    assert main(["connect", str(out), str(out), "--no-align", "--points", "3", "--json"]) == 0
    path = json.loads(capsys.readouterr().out)
    assert path["before"]["barrier"]["loss"]["reference"] == pytest.approx(0.0, abs=1e-9)
    # a wider merge has no linear path to its parents: one clean line, exit 1
    assert main(["connect", "zoo:digits-mlp-seed0", str(out), "--points", "3"]) == 1
    assert "one architecture" in capsys.readouterr().err
    assert main(["pleas", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "-o", str(out)]) == 1  # exists


@pytest.mark.slow
def test_pleas_cnn_with_folded_batchnorm_reloads(tmp_path, capsys):
    out = tmp_path / "cnn"
    assert main(["pleas", "zoo:digits-cnn-seed0", "zoo:digits-cnn-seed1", "--budget", "1.5", "--samples", "300",
                 "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["batchnorm_folded"] is True and cfg["channels"] == [rep["widths"]["features.0"],
                                                                   rep["widths"]["features.4"]]
    assert 1.0 < rep["size"] <= 1.5
    assert _test_acc(load_model(str(out)).model) == rep["accuracy"]["merged"]


def test_atlas_cli_writes_the_composition_its_coefficients_describe(tmp_path, capsys):
    out = tmp_path / "at"
    assert main(["atlas", "zoo:digits-mlp-base", "zoo:digits-mlp-ft0", "zoo:digits-mlp-ft1", "--steps", "30",
                 "--lr", "1e-2", "--samples", "200", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["coefficients_learned"] == 2 * 6 and rep["loss_end"] < rep["loss_start"]
    coefs = json.loads((out / "atlas-coefficients.json").read_text())
    assert coefs["finetunes"] == ["zoo:digits-mlp-ft0", "zoo:digits-mlp-ft1"] and len(coefs["blocks"]) == 6
    base = load_model("zoo:digits-mlp-base").model.state_dict()
    fts = [load_model(f).model.state_dict() for f in coefs["finetunes"]]
    saved = open_checkpoint(out).state_dict()
    for j, name in enumerate(coefs["blocks"]):  # theta_0 + sum_i c[i, j] tau_i, by hand
        want = base[name].double() + sum(coefs["coefficients"][i][j][0] * (fts[i][name].double() - base[name].double())
                                          for i in range(2))
        torch.testing.assert_close(saved[name].double(), want, rtol=1e-6, atol=1e-6)
    assert _test_acc(load_model(str(out)).model) == rep["accuracy"]["composed"]


def test_merge_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["pleas", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "--ratio", "0.5", "--budget", "1.5",
                 "-o", str(tmp_path / "a")]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["pleas", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "--matching", "magic",
                 "-o", str(tmp_path / "b")]) == 1
    assert "matching" in capsys.readouterr().err
    assert main(["atlas", "zoo:digits-mlp-base", "zoo:digits-mlp-ft9", "-o", str(tmp_path / "c")]) == 1
    assert "ft0..ft3" in capsys.readouterr().err
    assert main(["atlas", "zoo:digits-mlp-base", "zoo:digits-cnn-seed0", "-o", str(tmp_path / "d")]) == 1
    assert "one architecture" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
