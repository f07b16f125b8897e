"""weightlab vs llm-compressor 0.14 (its own venv, .venv-lc, run as a subprocess; skipped without it): SmoothQuant +
W8A8 dynamic, SmoothQuant + W8A8 static (its default moving-average observer), FP8 static and FP8_DYNAMIC with an FP8
KV cache, on the same tiny Llama and calibration samples. Every stored tensor is compared: smoothed norms, int8 / fp8
codes, weight scales, input scales and k/v scales are equal bit for bit."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from weightlab.compress.deploy import to_compressed_tensors  # noqa: E402
from weightlab.compress.quantize import quantize  # noqa: E402
from weightlab.io.reader import open_checkpoint  # noqa: E402

from test_awq import IDS, llama  # noqa: E402
from test_deploy_ct import save_tiny  # noqa: E402

LC_PYTHON = Path(__file__).resolve().parents[1] / ".venv-lc" / "bin" / "python"
RUNS = {"w8a8_sq": ("smoothquant", {"activations": "dynamic"}),
        "w8a8_static_sq": ("smoothquant", {"activations": "static", "observer": "minmax"}),
        "fp8": ("fp8", {"activations": "static", "strategy": "tensor"}),
        "fp8_dynamic_kv": ("fp8", {"activations": "dynamic", "kv_cache": True})}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not LC_PYTHON.is_file(), reason="llm-compressor's venv .venv-lc is not installed")]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def lc_outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lc")
    src = tmp / "src"
    save_tiny(src, hidden=64, inter=128, layers=2)
    m = llama()  # the outlier channel makes SmoothQuant's scales far from 1
    m.save_pretrained(src)
    r = subprocess.run([str(LC_PYTHON), str(Path(__file__).with_name("_lc_w8a8.py")), str(src), str(tmp / "lc")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return src, tmp / "lc"


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("name", list(RUNS))
def test_every_tensor_equals_llm_compressors(lc_outputs, name):
    from safetensors.torch import load_file

    src, lc = lc_outputs
    method, kw = RUNS[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")  # llm-compressor calibrates with eager attention
    batches = [{"input_ids": IDS[i:i + 1], "use_cache": False} for i in range(len(IDS))]  # its batch_size=1
    rep = quantize(model, method, 8, -1, sym=True, scale_dtype="float32", calib=batches, show_progress=False, **kw)
    with open_checkpoint(src) as ck:
        tensors, config, _ = to_compressed_tensors(rep.quantized, model, ck, rep.act)
    ref = load_file(str(lc / name / "model.safetensors"))
    assert sorted(tensors) == sorted(ref)
    for n, t in ref.items():
        assert tensors[n].dtype == t.dtype and torch.equal(_bits(tensors[n]), _bits(t)), n
    import json

    want = json.loads((lc / name / "config.json").read_text())["quantization_config"]
    got = config["quantization_config"]
    for key in ("format", "ignore", "quantization_status"):
        assert got[key] == want[key]
    strip = ("observer", "observer_kwargs")
    for part in ("weights", "input_activations"):
        a, b = got["config_groups"]["group_0"][part], want["config_groups"]["group_0"][part]
        # CT 0.20 leaves out the None fields 0.19 (llm-compressor's venv) writes
        assert ({k: v for k, v in a.items() if k not in strip and v is not None}
                == {k: v for k, v in b.items() if k not in strip and v is not None})
    assert (got["kv_cache_scheme"] is None) == (want["kv_cache_scheme"] is None)
