import json

import pytest
import torch

from weightlab.align import barriers, interpolate, reset_batchnorm
from weightlab.align.analysis import alignment_analysis
from weightlab.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_barrier_definitions_hand_computed():
    lam = [0.0, 0.25, 0.5, 0.75, 1.0]
    loss = [1.0, 2.0, 3.5, 3.0, 2.0]
    b = barriers(lam, loss)
    assert b["reference"] == pytest.approx(3.5 - 1.5)
    # above the chord 1 + l: 2-1.25, 3.5-1.5, 3-1.75 -> 2.0
    assert b["linear"] == pytest.approx(2.0)
    assert barriers([0, 0.5, 1], [1.0, 0.5, 2.0])["linear"] == pytest.approx(0.0)


def test_interpolate_keeps_integer_buffers_and_ends():
    a = {"w": torch.zeros(3), "n": torch.tensor(5)}
    b = {"w": torch.ones(3), "n": torch.tensor(9)}
    assert torch.equal(interpolate(a, b, 0.25)["w"], torch.full((3,), 0.25))
    assert interpolate(a, b, 0.5)["n"] == 5
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])


def test_reset_batchnorm_recomputes_exact_statistics():
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(4)).eval()
    x = torch.randn(300, 4) * 3 + 2
    reset_batchnorm(bn, x, batch_size=100)
    torch.testing.assert_close(bn[0].running_mean, x.mean(0), rtol=1e-5, atol=1e-5)
    assert not bn.training


def test_permutation_keeps_singular_values_and_aligns_vectors():
    from weightlab.align import permuted_copy, spec_from_module
    from weightlab.zoo import MLP

    torch.manual_seed(0)
    a = MLP(10, (16, 12), 4)
    s = spec_from_module(a)
    b = permuted_copy(a, s, s.random(1))
    an = alignment_analysis(a.state_dict(), b.state_dict(), a.state_dict())
    assert an["max_sv_change"] < 1e-6
    assert an["aligned_after"] == pytest.approx(1.0) and an["overlap_after"] == pytest.approx(1.0)
    assert an["aligned_before"] < 0.9 and an["distance_ratio"] == 0.0


@pytest.mark.slow
def test_align_and_connect_cli(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["align", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "weightlab-zoo-classifier" and cfg["hidden"] == [64, 64]
    perms = json.loads((out / "permutations.json").read_text())
    assert sorted(perms) == ["body.0", "body.2"] and sorted(perms["body.0"]) == list(range(64))
    assert main(["align", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "-o", str(out)]) == 1  # exists
    capsys.readouterr()
    rep = tmp_path / "r.html"
    assert main(["connect", "zoo:digits-mlp-seed0", str(out), "--points", "5", "--no-align", "--report", str(rep),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["before_path"]["lambdas"] == [0, 0.25, 0.5, 0.75, 1.0]
    # the saved folder is B aligned: its path is the aligned one, with a small barrier
    assert res["before"]["barrier"]["loss"]["reference"] < 0.1
    html = rep.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html


@pytest.mark.slow
def test_connect_cli_aligned_path_lowers_the_barrier(capsys):
    assert main(["connect", "zoo:digits-mlp-seed0", "zoo:digits-mlp-seed1", "--points", "9", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["after"]["barrier"]["loss"]["reference"] < 0.5 * res["before"]["barrier"]["loss"]["reference"]
    assert res["analysis"]["overlap_after"] > res["analysis"]["overlap_before"]
    assert res["analysis"]["max_sv_change"] < 1e-6


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["align", "zoo:digits-mlp-7", "zoo:digits-mlp-seed1", "-o", str(tmp_path / "x")]) == 1
    assert "zoo:DATASET-KIND-seedN" in capsys.readouterr().err
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert main(["align", str(tmp_path / "w.safetensors"), "zoo:digits-mlp-seed1", "-o", str(tmp_path / "y")]) == 1
    assert main(["align", "zoo:digits-mlp-seed0", "zoo:digits-cnn-seed1", "-o", str(tmp_path / "z")]) == 1
