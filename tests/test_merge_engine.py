"""The streaming merge engine: validation before compute, NaN/Inf, buffers, outputs, configs, CLI."""
import json
import subprocess
import sys

import pytest
import torch

import weightlab as wl
from weightlab.merge.api import load_merge_config
from weightlab.merge.validate import MergeValidationError


def _write(tmp_path, name, sd, config=None):
    folder = tmp_path / "tpl" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"architectures": ["Toy"], "vocab_size": 10}))
    return wl.save_state_dict(sd, tmp_path / name, template=folder)


def _models(tmp_path, n=3):
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(10, 4, generator=g), "w": torch.randn(4, 4, generator=g),
            "n": torch.tensor(42), "b": torch.randn(4, generator=g).bfloat16()}
    paths = [_write(tmp_path, "base", base)]
    for i in range(n):
        sd = {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point()
              else torch.tensor(i) for k, v in base.items()}
        paths.append(_write(tmp_path, f"m{i}", sd))
    return paths


def test_all_mismatches_listed_at_once(tmp_path):
    base = _write(tmp_path, "base", {"a": torch.zeros(3), "b": torch.zeros(2, 2), "c": torch.zeros(1)})
    bad1 = _write(tmp_path, "bad1", {"a": torch.zeros(4), "b": torch.zeros(2, 2), "x": torch.zeros(1)},
                  {"architectures": ["Toy"], "vocab_size": 12})
    bad2 = _write(tmp_path, "bad2", {"a": torch.zeros(3), "b": torch.zeros(2, 2, dtype=torch.int64),
                                     "c": torch.zeros(1)}, {"architectures": ["Other"], "vocab_size": 10})
    with pytest.raises(MergeValidationError) as e:
        wl.merge("ties", [bad1, bad2], base=base, out=tmp_path / "out")
    msg = str(e.value)
    for needle in ("lacks 1 tensor", "not in", "shape mismatch", "a: ",
                   "dtype mismatch", "vocabulary size 12", "architectures"):
        assert needle in msg, needle
    assert not (tmp_path / "out").exists()


def test_name_map_aligns_prefixed_names(tmp_path):
    base = {"model.w": torch.zeros(2)}
    other = {"w": torch.ones(2)}
    job = wl.merge.MergeJob(method="linear", models=[{"path": "a"}, {"path": "b", "name_map": {"w": "model.w"}}])
    res = wl.merge.run_merge(job, models=[base, other])
    assert torch.equal(res.state_dict["model.w"], torch.full((2,), 0.5))


def test_nonfinite_inputs_listed_and_nothing_written(tmp_path):
    base, m0, m1, _ = _models(tmp_path)
    sd = {n: t.clone() for n, t in wl.open_checkpoint(m1).items()}
    sd["w"][0, 0] = float("nan")
    sd["emb"][1, 1] = float("inf")
    bad = wl.save_state_dict(sd, tmp_path / "bad")
    with pytest.raises(wl.TensorValueError) as e:
        wl.merge("linear", [m0, bad], out=tmp_path / "out")
    assert "emb" in str(e.value) and "w (" in str(e.value) and "allow_nonfinite" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    out = wl.merge("linear", [m0, bad], out=tmp_path / "out", allow_nonfinite=True)
    assert torch.isnan(wl.open_checkpoint(out).get("w")[0, 0])


def test_output_folder_dtype_buffers_template_provenance(tmp_path):
    base, m0, m1, m2 = _models(tmp_path)
    out = wl.merge("ties", [m0, m1, m2], base=base, out=tmp_path / "out", density=0.5)
    ck = wl.open_checkpoint(out)
    assert int(ck.get("n")) == 42  # integer buffer copied from the base
    assert ck.info("b").dtype == torch.bfloat16 and ck.info("w").dtype == torch.float32  # base dtypes kept
    assert ck.config == {"architectures": ["Toy"], "vocab_size": 10}
    prov = wl.Provenance.from_metadata(ck.metadata)
    assert prov.method == "merge/ties" and prov.params["params"]["density"] == 0.5
    assert "merge/ties" in (out / "README.md").read_text()
    out16 = wl.merge("linear", [m0, m1], out=tmp_path / "o16", dtype="float16")
    assert wl.open_checkpoint(out16).info("w").dtype == torch.float16
    with pytest.raises(wl.OutputExistsError):
        wl.merge("linear", [m0, m1], out=tmp_path / "o16")
    with pytest.raises(wl.OutputExistsError, match="input"):
        wl.merge("linear", [m0, m1], out=m0, force=True)


def test_requires_base_and_unknown_method(tmp_path):
    _, m0, m1, _ = _models(tmp_path)
    with pytest.raises(wl.ConfigError, match="needs a base"):
        wl.merge("ties", [m0, m1])
    with pytest.raises(wl.ConfigError, match="Did you mean 'ties'"):
        wl.merge("tis", [m0, m1])
    with pytest.raises(wl.ConfigError, match="density"):
        wl.merge("ties", [m0, m1], base=m0, density=1.5)


def test_mergekit_yaml_translation(tmp_path):
    cfg = tmp_path / "mk.yaml"
    cfg.write_text("""
models:
  - model: /m/a
    parameters: {weight: 0.7, density: 0.5}
  - model: /m/b
    parameters: {weight: 0.3}
  - model: /m/base
base_model: /m/base
merge_method: ties
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
""")
    job = load_merge_config(cfg)
    assert job.method == "ties" and job.base == "/m/base" and job.dtype == "bfloat16"
    assert [(m.path, m.weight, m.density) for m in job.models] == [("/m/a", 0.7, 0.5), ("/m/b", 0.3, None)]
    assert job.params["zero_sign"] == "positive" and job.params["density"] == 1.0 and job.params["trim"] == "topk"
    for bad, needle in (("chat_template: chatml\n", "chat_template"), ("slices: []\n", "slices")):
        (tmp_path / "bad.yaml").write_text(cfg.read_text() + bad)
        with pytest.raises(wl.ConfigError, match=needle):
            load_merge_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(cfg.read_text().replace("merge_method: ties", "merge_method: sce"))
    with pytest.raises(wl.ConfigError, match="sce"):
        load_merge_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(cfg.read_text().replace("weight: 0.3", "weight: [0.1, abc]"))
    with pytest.raises(wl.ConfigError, match="must be a number"):
        load_merge_config(tmp_path / "bad.yaml")


def test_mergekit_ties_semantics_match_reference_formula(tmp_path):
    """mergekit's TIES: top-k by magnitude per tensor, sign of the weighted sum (0 -> +), weighted disjoint mean."""
    base, m0, m1, m2 = _models(tmp_path)
    cfg = tmp_path / "mk.yaml"
    cfg.write_text(f"""
models:
  - {{model: {m0}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {m1}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {m2}, parameters: {{weight: 2.0, density: 0.5}}}}
base_model: {base}
merge_method: ties
parameters: {{normalize: true}}
""")
    out = wl.merge.run_merge(load_merge_config(cfg), tmp_path / "out").output
    b = wl.open_checkpoint(base).get("w").double()
    ws = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64).view(3, 1, 1)
    deltas = []
    for p in (m0, m1, m2):
        d = wl.open_checkpoint(p).get("w").double() - b
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.argsort(d.abs().view(-1), descending=True)[: int(0.5 * d.numel())]] = True
        deltas.append(d * keep.view(d.shape))
    wd = torch.stack(deltas) * ws
    majority = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
    mask = wd.sign() == majority
    div = (ws * mask).sum(0)
    div[div == 0] = 1
    expect = (b + (wd * mask).sum(0) / div).float()
    assert torch.allclose(wl.open_checkpoint(out).get("w"), expect, atol=1e-6)


def test_cli_merge_config_and_flag_forms(tmp_path):
    base, m0, m1, _ = _models(tmp_path)
    cfg = tmp_path / "wl.yaml"
    cfg.write_text(f"method: task-arithmetic\nbase: {base}\nmodels: [{m0}, {m1}]\nparams: {{lambda: 0.5}}\n")
    r = subprocess.run([sys.executable, "-m", "weightlab", "merge", str(cfg), str(tmp_path / "o1")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "weightlab", "merge", "--method", "ties", "--base", str(base), str(m0),
                        str(m1), "--density", "0.5", "-o", str(tmp_path / "o2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expect = wl.merge("ties", [m0, m1], base=base, density=0.5)
    got = wl.open_checkpoint(tmp_path / "o2")
    assert all(torch.equal(got.get(k), v) for k, v in expect.items())
    r = subprocess.run([sys.executable, "-m", "weightlab", "merge", "--method", "ties", str(m0), str(m1),
                        "-o", str(tmp_path / "o3")], capture_output=True, text=True)
    assert r.returncode == 1 and "needs a base" in r.stderr and "Traceback" not in r.stderr


def test_merged_llama_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = transformers.LlamaForCausalLM(cfg)
        m.save_pretrained(tmp_path / f"m{seed}")
        paths.append(tmp_path / f"m{seed}")
    out = wl.merge("ties", paths[1:], base=paths[0], out=tmp_path / "merged", density=0.3)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    expect = wl.merge("ties", paths[1:], base=paths[0], density=0.3)
    for k, v in model.state_dict().items():
        if k in expect:
            assert torch.equal(v, expect[k]), k
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


@pytest.mark.parametrize("yaml_text,needle", [
    ("merge_method: linear\nmodels: [{model: M0, parameters: {weight: abc}}, {model: M1}]\n",
     "models[0].weight must be a number"),
    ("merge_method: ties\nbase_model: M0\nmodels: [{model: M0}, {model: M1, parameters: {density: 1.5}}]\n",
     "models[1].density must be in"),
    ("merge_method: linear\nmodels: [{model: M0, parameters: [1, 2]}, {model: M1}]\n",
     "models[0].parameters must be a mapping"),
    ("merge_method: linear\nparameters: [1]\nmodels: [{model: M0}, {model: M1}]\n", "parameters must be a mapping"),
])
def test_mergekit_scalars_are_one_clear_line(tmp_path, yaml_text, needle):
    from weightlab.cli import main

    paths = _models(tmp_path, 2)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml_text.replace("M0", str(paths[0])).replace("M1", str(paths[1])))
    with pytest.raises(wl.ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_merge_config(cfg)
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 1 and not (tmp_path / "out").exists()


def test_zero_weight_sum_and_bad_shard_size_refused_before_any_output(tmp_path):
    from weightlab.merge.engine import run_merge
    from weightlab.merge.job import MergeJob

    paths = _models(tmp_path, 2)
    for job, needle in ((MergeJob(method="linear", models=[{"path": str(paths[0]), "weight": 1.0},
                                                          {"path": str(paths[1]), "weight": -1.0}]), "sum to zero"),
                        (MergeJob(method="linear", models=[str(p) for p in paths], max_shard_size="lots"),
                         "max_shard_size")):
        with pytest.raises(wl.ConfigError, match=needle):
            run_merge(job, tmp_path / "out")
        assert not (tmp_path / "out").exists()
