"""weightlab's merge equals mergekit's, tensor by tensor, on the same mergekit YAML (fp32 tiny Llamas).

mergekit runs as its own program (`mergekit-yaml`, from the venv `make test` builds in .venv-mk, or
$WEIGHTLAB_MERGEKIT_YAML, or PATH). Only deterministic methods are compared: DARE and DELLA draw random
masks with different generators in the two tools.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import weightlab as wl
from weightlab.merge.api import load_merge_config
from weightlab.merge.engine import run_merge

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _mergekit_yaml() -> str | None:
    for cand in (os.environ.get("WEIGHTLAB_MERGEKIT_YAML"), str(REPO / ".venv-mk" / "bin" / "mergekit-yaml"),
                 shutil.which("mergekit-yaml")):
        if cand and Path(cand).is_file():
            return cand
    return None


MK = _mergekit_yaml()
needs_mk = pytest.mark.skipif(MK is None, reason="mergekit-yaml not found (make test builds it in .venv-mk)")


def _llama(folder: Path, seed: int, base: dict | None = None, layers: int = 4, extra_tokens: int = 0) -> dict:
    """A tiny fp32 Llama checkpoint (config.json, tokenizer, safetensors); a fine-tune of ``base`` when given,
    with ``extra_tokens`` added tokens (and embedding/head rows) of its own."""
    from _tiny_llama import tiny_tokenizer

    g = torch.Generator().manual_seed(seed)
    h, f, v = 32, 64, 64 + extra_tokens
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h // 2, h),
                       p + "self_attn.v_proj.weight": (h // 2, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    sd = {}
    for n, s in shapes.items():
        if base is None:
            sd[n] = torch.ones(s) + 0.1 * torch.randn(s, generator=g) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
        else:  # a fine-tune: the base plus a dense delta with some large entries
            b = base[n]
            if b.shape != s:  # new tokens: new rows
                b = torch.cat([b, 0.1 * torch.randn(s[0] - b.shape[0], *s[1:], generator=g)])
            sd[n] = b + 0.02 * torch.randn(s, generator=g) * (1 + 4 * (torch.rand(s, generator=g) < 0.05))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": layers, "vocab_size": v,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": False,
           "torch_dtype": "float32"}
    tpl = folder.parent / (folder.name + "-tpl")
    tpl.mkdir(parents=True, exist_ok=True)
    (tpl / "config.json").write_text(json.dumps(cfg))
    tiny_tokenizer(tpl, vocab_size=64)
    if extra_tokens:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tpl))
        tok.add_tokens([f"<new{i}>" for i in range(extra_tokens)])
        tok.save_pretrained(str(tpl))
    wl.save_state_dict(sd, folder, template=tpl)
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = _llama(root / "base", 0)
    for i in (1, 2):
        _llama(root / f"ft{i}", i, base)
    _llama(root / "ft3", 3, base, extra_tokens=2)
    return root


CONFIGS = {
    "linear-gradient": """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: [1, 0.2, 0.7]}}
  - model: {ft2}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}, {{value: [0.1, 1]}}]
""",
    "slerp": """
merge_method: slerp
base_model: {ft1}
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 4]
      - model: {ft2}
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "nuslerp": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false}}
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models: [{{model: {ft1}}}, {{model: {ft2}}}]
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.7, gamma: 0.05}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 0.5, gamma: 0.1}}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.6, gamma: 0.05}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.6, gamma: 0.05}}
parameters: {{normalize: true, lambda: 0.8}}
""",
    "ties-filter-density": """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: [{{filter: self_attn, value: 0.3}}, {{value: 0.6}}]}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.5}}
""",
    "task-arithmetic-lambda-gradient": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
parameters: {{lambda: [0.5, 1.5]}}
""",
    "tokenizer-union": """
merge_method: linear
base_model: {ft1}
tokenizer_source: union
models:
  - model: {ft1}
    parameters: {{weight: 0.4}}
  - model: {ft3}
    parameters: {{weight: 0.6}}
""",
    "tokenizer-base-ties": """
merge_method: ties
base_model: {base}
tokenizer_source: base
models:
  - model: {ft3}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.5}}
""",
    "passthrough-frankenmerge": """
merge_method: passthrough
slices:
  - sources: [{{model: {ft1}, layer_range: [0, 3]}}]
  - sources: [{{model: {ft2}, layer_range: [1, 4]}}]
""",
    "linear-slices": """
merge_method: linear
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 2]
        parameters: {{weight: 0.25}}
      - model: {ft2}
        layer_range: [2, 4]
        parameters: {{weight: 0.75}}
  - sources:
      - model: {ft2}
        layer_range: [0, 2]
        parameters: {{weight: 1.0}}
      - model: {ft1}
        layer_range: [1, 3]
        parameters: {{weight: [0, 1]}}
""",
}


@needs_mk
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_as_mergekit(models, tmp_path, name):
    text = CONFIGS[name].format(base=models / "base", ft1=models / "ft1", ft2=models / "ft2", ft3=models / "ft3")
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    mk_out, wl_out = tmp_path / "mk", tmp_path / "wl"
    r = subprocess.run([MK, str(cfg), str(mk_out)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_merge(load_merge_config(cfg), wl_out)
    mk, ours = wl.open_checkpoint(mk_out), wl.open_checkpoint(wl_out)
    assert sorted(ours.names()) == sorted(mk.names())
    worst = []
    for n in mk.names():
        a, b = mk.get(n).double(), ours.get(n).double()
        assert a.shape == b.shape, n
        err = float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
        worst.append((err, n))
    err, n = max(worst)
    assert err <= 1e-4, f"{name}: {n} differs by {err:.2e} of its max"
    mk_cfg = json.loads((mk_out / "config.json").read_text())
    wl_cfg = json.loads((wl_out / "config.json").read_text())
    assert wl_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]
    assert wl_cfg["vocab_size"] == mk_cfg["vocab_size"] == ours.info("model.embed_tokens.weight").shape[0]
