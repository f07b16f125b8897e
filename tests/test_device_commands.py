"""The device policy on every computing command: --device cuda without CUDA is one error line before any
work, and each Python entry point's device= path gives the CPU reference results (cuda runs where present)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weightlab as wl

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- CLI: one line, no work done

def _commands(tmp: Path) -> dict[str, list[str]]:
    missing = str(tmp / "no-such-model")  # the device error must come before anything is read
    out = str(tmp / "out")
    return {
        "inspect": ["inspect", missing, "--device", "cuda"],
        "heads": ["heads", missing, "--device", "cuda"],
        "neurons": ["neurons", missing, "--token", "dog", "--device", "cuda:0"],
        "neurons compare": ["neurons", "compare", missing, missing, "--device", "cuda"],
        "score-data": ["score-data", "-m", "el2n", "-d", "digits", "-o", str(tmp / "s.csv"), "--device", "cuda"],
        "align": ["align", missing, missing, "-o", out, "--device", "cuda"],
        "connect": ["connect", missing, missing, "--device", "cuda"],
        "pleas": ["pleas", missing, missing, "-o", out, "--device", "cuda"],
        "atlas": ["atlas", missing, missing, "-o", out, "--device", "cuda"],
        "tune": ["tune", missing, "-o", out, "--device", "cuda"],
        "merge": ["merge", "--method", "ties", "--base", missing, missing, missing, "-o", out, "--device", "cuda"],
    }


@NO_CUDA
@pytest.mark.parametrize("name", ["inspect", "heads", "neurons", "neurons compare", "score-data", "align", "connect",
                                  "pleas", "atlas", "tune", "merge"])
def test_cli_device_cuda_without_cuda_is_one_error_line_before_any_work(name, tmp_path, capsys):
    from weightlab.cli import main

    assert main(_commands(tmp_path)[name]) == 1
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "Traceback" not in cap.err, cap.err
    assert not any(p.name in ("out", "s.csv") for p in tmp_path.iterdir())


def test_cli_unknown_device_is_one_error_line(tmp_path, capsys):
    from weightlab.cli import main

    assert main(["inspect", str(tmp_path / "x"), "--device", "tpu"]) == 1
    assert "unknown device 'tpu'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- merge: opt-in for heavy rules

def _merge_inputs():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(24, 16, generator=g), "b": torch.randn(16, generator=g),
            "h": torch.randn(16, 24, generator=g).bfloat16()}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in base.items()}
              for _ in range(3)]
    return base, models


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("tsv-m", {}), ("r-tsvm", {})])
def test_merge_rules_on_a_device_match_the_cpu(method, params, device):
    base, models = _merge_inputs()
    ref = wl.merge(method, models, base=base, **params)
    got = wl.merge(method, models, base=base, device=device, **params)
    for k, v in ref.items():
        assert got[k].device.type == "cpu" and got[k].dtype == v.dtype
        if device == "cpu":
            assert torch.equal(got[k], v), k
        else:  # other kernels, other rounding; TIES selections can flip on exact ties only
            assert torch.allclose(got[k].float(), v.float(), rtol=1e-5, atol=1e-5), k


def test_merge_device_is_refused_for_io_bound_rules_and_auto_means_cpu_there():
    base, models = _merge_inputs()
    with pytest.raises(wl.ConfigError, match="no CUDA device|runs on the CPU"):
        wl.merge("linear", models, device="cuda")
    ref = wl.merge("linear", models)
    got = wl.merge("linear", models, device="auto")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- score-data

@pytest.mark.parametrize("device", DEVICES)
def test_scores_on_a_device(device):
    from weightlab.data import load_scoring_data, score_dataset

    d = load_scoring_data("wine")
    for method, params in (("el2n", {"runs": 1, "epochs": 1}), ("grand", {"runs": 1, "epochs": 1}),
                           ("forgetting", {"runs": 1, "epochs": 2}), ("prototype", {})):
        ref = score_dataset(method, d, show_progress=False, **params)
        got = score_dataset(method, d, show_progress=False, device=device, **params)
        assert got.scores.device.type == "cpu"
        if device == "cpu":
            assert torch.equal(got.scores, ref.scores), method
        elif method != "forgetting":  # event counts may differ by a flip on another device's rounding
            assert torch.allclose(got.scores, ref.scores, rtol=1e-3, atol=1e-4), method


# ----------------------------------------------------------------------------- heads and neurons

@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from _internals_tiny import WORDS, plant_sink, tiny_llama, word_tokenizer

    tok = word_tokenizer()
    import random

    rng = random.Random(0)
    return plant_sink(tiny_llama(len(tok))), tok, " ".join(rng.choice(WORDS) for _ in range(300))


@pytest.mark.parametrize("device", DEVICES)
def test_heads_and_neurons_on_a_device(lm, device):
    import copy

    from weightlab.inspect.heads import HeadsConfig, analyze_heads
    from weightlab.inspect.neurons import NeuronsConfig, decode_neurons

    model, tok, text = lm
    cfg = HeadsConfig(windows=1, seqlen=32, dormant_test="linear")
    ref = analyze_heads(copy.deepcopy(model), tok, cfg, texts={"t": text}, show_progress=False)
    moved = copy.deepcopy(model)
    got = analyze_heads(moved, tok, cfg, texts={"t": text}, show_progress=False, device=device)
    assert next(moved.parameters()).device.type == device  # moved in place, as documented
    assert [r["state"] for r in got.heads] == [r["state"] for r in ref.heads]
    for a, b in zip(ref.heads, got.heads):
        assert b["sink_mass"] == pytest.approx(a["sink_mass"], rel=1e-4, abs=1e-6)
    nref = decode_neurons(copy.deepcopy(model), NeuronsConfig(top_k=3), show_progress=False)
    ngot = decode_neurons(copy.deepcopy(model), NeuronsConfig(top_k=3), show_progress=False, device=device)
    for li in nref.top_ids:
        assert ngot.top_ids[li].device.type == "cpu"
        assert torch.equal(ngot.top_ids[li][:, 0], nref.top_ids[li][:, 0])


# ----------------------------------------------------------------------------- align

@pytest.mark.parametrize("device", DEVICES)
def test_weight_matching_and_pleas_on_a_device(device):
    from weightlab.align.matching import match
    from weightlab.align.pleas import pleas

    def mlp(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.ReLU(),
                                   torch.nn.Linear(12, 3))

    a, b = mlp(0), mlp(1)
    ref = match(a, b)
    got = match(a, b, device=device)
    assert all(torch.equal(got.perms[p], ref.perms[p]) and got.perms[p].device.type == "cpu" for p in ref.perms)
    assert got.objective == pytest.approx(ref.objective, rel=1e-12)
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(2))
    pr, pg = pleas(a, b, x, ratio=0.25), pleas(a, b, x, ratio=0.25, device=device)
    assert next(pg.model.parameters()).device.type == "cpu" and next(a.parameters()).device.type == "cpu"
    assert torch.allclose(pg.model(x), pr.model(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- inspect under torchrun (CLI)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_inspect_under_two_processes_writes_once_and_equals_one_process(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.weight": torch.randn(40 + 4 * i, 24, generator=g) for i in range(6)},
              str(tmp_path / "m.safetensors"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    base_env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "weightlab", "inspect", str(tmp_path / "m.safetensors"), "--threads", "1",
           "--device", "cpu"]
    one = subprocess.run(cmd + ["--json", str(tmp_path / "one.json")], env=base_env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    procs = [subprocess.Popen(cmd + ["--json", str(tmp_path / "two.json")],
                              env={**base_env, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[1][0].strip() == "" and "wrote" not in outs[1][1]  # rank 1 prints and writes nothing
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["layers"] == b["layers"] and b["summary"]["processes"] == 2
