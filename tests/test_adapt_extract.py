"""LoRA extraction from a fine-tune (mergekit-extract-lora parity): planted ranks come back exactly, truncation
errors are Eckart-Young optimal, PEFT loads the export onto the base with the fine-tune's logits, bad inputs fail
before any output exists, and the CLI round trip."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab.adapt.extract import extract_lora
from weightlab.cli import main
from weightlab.errors import ConfigError, OutputExistsError

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
SHAPES = {"layers.0.q.weight": (48, 40), "layers.0.up.weight": (64, 40)}


def _orth(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def planted(tmp_path, s=(4.0, 2.0, 1.0)):
    """base/ and ft/ folders whose matrices differ by a rank-len(s) change with singular values s; the norm is
    unchanged. Returns the folders and the changes as stored (float64 differences of the float32 files)."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(*shape, generator=g) for n, shape in SHAPES.items()}
    base["layers.0.norm.weight"] = torch.ones(40)
    ft = dict(base)
    for n, (m, k) in SHAPES.items():
        D = (_orth(m, len(s), g) * torch.tensor(s, dtype=torch.float64)) @ _orth(k, len(s), g).T
        ft[n] = (base[n].double() + D).float()
    for name, sd in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "base", tmp_path / "ft", {n: ft[n].double() - base[n].double() for n in SHAPES}


def product(folder, module):
    sd = load_file(str(folder / "adapter_model.safetensors"))
    p = f"base_model.model.{module}"
    return sd[f"{p}.lora_B.weight"].double() @ sd[f"{p}.lora_A.weight"].double()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_planted_rank_is_recovered_exactly_and_the_rules_find_it(tmp_path, device):
    b, f, deltas = planted(tmp_path)
    rep = extract_lora(b, f, tmp_path / "r3", rank=3, device=device)
    assert rep.ranks() == {"layers.0.q": 3, "layers.0.up": 3} and rep.rel_error < 1e-5
    for n, D in deltas.items():
        assert (product(tmp_path / "r3", n.removesuffix(".weight")) - D).norm() / D.norm() < 1e-5
    conf = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == conf["lora_alpha"] == 3 and conf["rank_pattern"] == {}
    assert conf["target_modules"] == ["layers.0.q", "layers.0.up"] and conf["modules_to_save"] is None  # norm same
    for rule in (dict(energy=0.999), dict(sv_threshold=0.01), dict(energy=0.999, max_rank=8, svd="lowrank"),
                 dict(rank=30, sv_epsilon=1e-3)):
        rep = extract_lora(b, f, tmp_path / "rule", force=True, device=device, **rule)
        assert set(rep.ranks().values()) == {3} and rep.rel_error < 1e-5, rule
    assert {m["svd"] for m in rep.modules} == {"full"}
    rep = extract_lora(b, f, tmp_path / "rule", force=True, device=device, energy=0.999, max_rank=8, svd="lowrank")
    assert {m["svd"] for m in rep.modules} == {"randomized"}
    # energy 0.9: the top two of (4, 2, 1) hold 20/21 of it, and the error is the dropped 1 / sqrt(21)
    rep = extract_lora(b, f, tmp_path / "rule", force=True, device=device, energy=0.9)
    assert set(rep.ranks().values()) == {2}
    assert all(abs(m["rel_error"] - 21 ** -0.5) < 1e-5 and abs(m["kept_energy"] - 20 / 21) < 1e-6
               for m in rep.modules)


def test_c_truncation_error_is_the_tail_singular_values_norm(tmp_path):
    g = torch.Generator().manual_seed(1)
    W, D = torch.randn(40, 24, generator=g), 0.1 * torch.randn(40, 24, generator=g)
    for name, t in (("base", W), ("ft", W + D)):
        (tmp_path / name).mkdir()
        save_file({"l.weight": t}, str(tmp_path / name / "model.safetensors"))
    Dt = (W + D).double() - W.double()
    s = torch.linalg.svdvals(Dt)
    for k in (1, 4, 12, 24):
        rep = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "o", rank=k, force=True, device="cpu")
        want = float(s[k:].norm() / s.norm())
        got = (Dt - product(tmp_path / "o", "l")).norm() / Dt.norm()
        assert abs(rep.modules[0]["rel_error"] - want) <= 1e-4 * want + 3e-6, k
        assert abs(float(got) - want) <= 1e-4 * want + 3e-6, k
        assert abs(rep.modules[0]["kept_energy"] - float((s[:k] ** 2).sum() / (s ** 2).sum())) < 1e-5
    # --no-distribute-scale: B = U (orthonormal columns), A = S Vh; the same product
    extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "o", rank=4, force=True, device="cpu",
                 distribute_scale=False)
    B = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))["base_model.model.l.lora_B.weight"]
    assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and a fine-tune that changed every projection, two norms, the embedding and the head."""
    pytest.importorskip("transformers")
    from _tiny_llama import tiny_llama

    d = tmp_path_factory.mktemp("llama")
    base = tiny_llama(d / "base")
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith("proj.weight") or n == "lm_head.weight":
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.model.norm.weight.add_(0.1)
        ft.model.layers[1].post_attention_layernorm.weight.mul_(1.1)
        ft.model.embed_tokens.weight[:20].add_(0.05 * torch.randn(20, 64, generator=g))
    ft.save_pretrained(d / "ft")
    return d, base, ft


@pytest.mark.parametrize("embeddings", ["save", "lora"])
def test_b_full_rank_export_loads_in_peft_with_the_fine_tunes_logits(llama, tmp_path, embeddings):
    peft = pytest.importorskip("peft")
    d, base, ft = llama
    rep = extract_lora(d / "base", d / "ft", tmp_path / "lora", rank=64, embeddings=embeddings, device="cpu")
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert conf["r"] == 64 and conf["task_type"] == "CAUSAL_LM"
    assert conf["rank_pattern"] == {f"model.layers.{i}.self_attn.{p}_proj": 32 for i in (0, 1) for p in "kv"}
    saved = set(conf["modules_to_save"])
    assert {"model.norm", "model.layers.1.post_attention_layernorm"} <= saved
    assert "model.layers.0.input_layernorm" not in saved  # unchanged: not written
    if embeddings == "save":
        assert {"model.embed_tokens", "lm_head"} <= saved and len(conf["target_modules"]) == 14
    else:
        assert {"model.embed_tokens", "lm_head"} <= set(conf["target_modules"]) and not {"lm_head"} & saved
    assert rep.rel_error < 1e-5
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        want = ft(input_ids=x).logits
        assert not torch.allclose(base(input_ids=x).logits, want, atol=1e-3)
        assert torch.allclose(pm(input_ids=x).logits, want, atol=1e-4)


def test_b_conv1d_bias_changes_load_in_peft(tmp_path):
    """GPT-2's Conv1D (weights stored (in, out): fan_in_fan_out) and a changed bias (PEFT lora_bias)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith(("c_attn.weight", "c_fc.weight", "mlp.c_proj.weight")):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.transformer.h[0].attn.c_attn.bias.add_(0.05)
    ft.save_pretrained(tmp_path / "ft")
    rep = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora", rank=32, device="cpu")
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert conf["fan_in_fan_out"] and conf["lora_bias"] and conf["modules_to_save"] is None
    assert {m["kind"] for m in rep.modules} == {"conv1d"} and len(rep.modules) == 3
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=x).logits, ft(input_ids=x).logits, atol=1e-4)


def test_d_bad_inputs_fail_before_any_output(tmp_path):
    b, f, _ = planted(tmp_path)
    sd = load_file(str(f / "model.safetensors"))

    def variant(name, tensors):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        return tmp_path / name

    out = tmp_path / "out"
    shape = variant("shape", {**sd, "layers.0.q.weight": torch.zeros(48, 41)})
    with pytest.raises(ConfigError, match=r"'layers\.0\.q\.weight' has shape \(48, 40\) in the base and \(48, 41\)"):
        extract_lora(b, shape, out)
    missing = variant("missing", {k: v for k, v in sd.items() if k != "layers.0.up.weight"})
    with pytest.raises(ConfigError, match=r"missing from the fine-tune: layers\.0\.up\.weight"):
        extract_lora(b, missing, out)
    nan = variant("nan", {**sd, "layers.0.up.weight": torch.full((64, 40), float("nan"))})
    with pytest.raises(ConfigError, match=r"layers\.0\.up\.weight.*NaN"):
        extract_lora(b, nan, out, rank=2)
    for o in (f, f / "inside", b):
        with pytest.raises(OutputExistsError, match="input"):
            extract_lora(b, f, o)
    with pytest.raises(ConfigError, match="no LoRA to extract"):
        extract_lora(b, b.parent / "base", out)  # identical models
    for bad, msg in ((dict(rank=2, energy=0.5), "one rank rule"), (dict(energy=1.5), "energy"),
                     (dict(target_modules="(("), "invalid"), (dict(target_modules="nothing"), "matches no"),
                     (dict(energy=0.9, svd="lowrank"), "rank bound"), (dict(embeddings="x"), "embeddings"),
                     (dict(dtype="int3"), "dtype")):
        with pytest.raises(ConfigError, match=msg):
            extract_lora(b, f, out, **bad)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing published, no temporary left
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        extract_lora(b, f, out, rank=1)
    assert extract_lora(b, f, out, rank=1, force=True).r == 1


def test_e_cli_round_trip(tmp_path, capsys):
    from weightlab import adapt

    b, f, deltas = planted(tmp_path)
    out = tmp_path / "cli"
    args = ["adapter", "extract", str(b), str(f), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--energy", "0.999", "--json", str(tmp_path / "rep.json")]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert {m["name"]: m["rank"] for m in rep["modules"]} == {"layers.0.q": 3, "layers.0.up": 3}
    assert rep["rel_error"] < 1e-5 and rep["rule"] == "energy 0.999"
    # weightlab's own PEFT importer folds the adapter into the base's layers: the fine-tune's weights come back
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList([torch.nn.Module()])
    net.layers[0].q, net.layers[0].up = torch.nn.Linear(40, 48, bias=False), torch.nn.Linear(40, 64, bias=False)
    net.load_state_dict({k: v for k, v in load_file(str(b / "model.safetensors")).items() if "norm" not in k})
    adapt.fold(adapt.import_peft(net, out))
    ft = load_file(str(f / "model.safetensors"))
    for n in deltas:
        assert torch.allclose(net.state_dict()[n], ft[n], atol=1e-5)
    capsys.readouterr()
    assert main([*args, "-r", "2"]) == 1 and "already exists" in capsys.readouterr().err
    assert main([*args, "-r", "2", "--force"]) == 0
    printed = capsys.readouterr().out
    assert "ranks 2-2" in printed and "relative error" in printed
    assert main(["adapter", "extract", str(b), str(f), "-o", str(f)]) == 1
    assert "input" in capsys.readouterr().err
    assert main([*args, "-r", "2", "--energy", "0.5", "--force"]) == 1
    assert "one rank rule" in capsys.readouterr().err


def test_registered_as_a_recipe_step(tmp_path, capsys):
    from weightlab.io.reader import open_checkpoint
    from weightlab.registry import get_method

    spec = get_method("adapt", "extract-lora")
    assert spec.kind == "report" and spec.contract.workdir and spec.regime.value == "streaming"
    assert spec.defaults()["embeddings"] == "save"
    b, f, _ = planted(tmp_path)
    (tmp_path / "work").mkdir()
    with open_checkpoint(f) as ck:
        rep = spec.fn(ck, spec.make_config({"base": str(b), "rank": 3}), workdir=tmp_path / "work")
    assert rep["path"] == "lora" and rep["artifacts"] == {"lora": tmp_path / "work" / "lora"}
    assert (tmp_path / "work" / "lora" / "adapter_config.json").is_file() and rep["r"] == 3
    assert main(["methods", "extract-lora"]) == 0 and "mergekit" in capsys.readouterr().out
