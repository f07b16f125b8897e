import pytest
from pydantic import Field

import weightlab as wl
from weightlab.registry import MethodConfig, Registry


class Cfg(MethodConfig):
    k: float = Field(0.2, ge=0, le=1)


def test_register_get_defaults_and_validation():
    reg = Registry()

    @reg.register("merge", "toy", paper="A paper", summary="toy", config=Cfg, aliases=("toy2",))
    def toy(src, cfg):
        return cfg.k

    spec = reg.get("merge", "toy2")
    assert spec.fn is toy and spec.defaults() == {"k": 0.2} and spec.paper == "A paper"
    assert spec.make_config({"k": 0.5}).k == 0.5
    with pytest.raises(wl.ConfigError, match="k"):
        spec.make_config({"k": 2})
    with pytest.raises(wl.ConfigError, match="extra|Extra"):
        spec.make_config({"kk": 1})
    with pytest.raises(wl.ConfigError, match="Did you mean 'toy'"):
        reg.get("merge", "tyo")
    with pytest.raises(wl.ConfigError, match="unknown family"):
        reg.get("nope", "toy")
    with pytest.raises(ValueError, match="twice"):
        reg.register("merge", "toy", paper="", summary="")(lambda s, c: None)


def test_global_registry_has_every_family_loaded():
    specs = wl.list_methods()
    assert {s.family for s in specs} >= {"inspect", "compress"}
    for s in specs:
        assert s.paper and s.summary and s.regime in wl.Regime


def test_every_module_that_registers_a_method_is_discovered():
    """A method file nothing imports would be missing from `weightlab methods` (robust-weight-signature was).
    In a fresh interpreter: other tests may have imported the modules already."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    registering = [p for p in (src / "weightlab").rglob("*.py")
                   if re.search(r"^@register\(|^\s*register\(", p.read_text(), re.M) and p.name != "registry.py"]
    assert len(registering) > 40
    names = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__") for p in registering}
    code = ("import json, sys; from weightlab.registry import list_methods; ms = list_methods(); "
            "print(json.dumps([sorted(sys.modules), [m.name for m in ms]]))")
    mods, methods = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout)
    assert not sorted(names - set(mods))
    assert "robust-weight-signature" in methods


def test_each_kind_has_a_typed_contract():
    import pytest

    from weightlab.registry import KINDS, QuantizerContract, Registry, list_methods

    for s in list_methods():
        assert isinstance(s.contract, KINDS[s.kind].contract), s.name
    gptq = next(s for s in list_methods("compress") if s.name == "gptq")
    assert isinstance(gptq.contract, QuantizerContract) and gptq.contract.needs == ("hessian",)
    assert gptq.contract.zero_level and gptq.contract.default_bits == 4
    reg = Registry()
    with pytest.raises(ValueError, match="declares only"):  # an unknown fact is an error at import, not ignored
        reg.register("compress", "x", paper="p", summary="s", kind="quantize", default_bitz=3)(lambda ctx: None)


def test_verb_results_share_as_dict_and_save(tmp_path):
    import json

    import pytest
    import torch

    import weightlab as wl
    from weightlab.errors import OutputExistsError

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    rep = wl.prune(model, "magnitude", 0.5, show_progress=False)
    p = rep.save(tmp_path / "prune.json")
    assert json.loads(p.read_text()) == json.loads(json.dumps(rep.as_dict(), default=str))
    with pytest.raises(OutputExistsError):
        rep.save(p)
    q = wl.quantize(model, "rtn", 4, group_size=8, show_progress=False)
    assert json.loads(q.save(tmp_path / "q.json").read_text())["bits"] == 4
