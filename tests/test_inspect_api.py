"""`wl.inspect.analyze`, the registered inspect methods, the `weightlab inspect` command and its report."""
import json
import re

import numpy as np
import pytest
import torch

import weightlab as wl
from weightlab.cli import main
from weightlab.inspect import InspectResult, analyze


@pytest.fixture(autouse=True)
def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 24)
        self.conv = torch.nn.Conv2d(8, 16, 3)
        self.point = torch.nn.Conv2d(16, 16, 1)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(24, 24) for _ in range(4))
        self.norm = torch.nn.LayerNorm(24)
        self.head = torch.nn.Linear(24, 64, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.small = torch.nn.Linear(24, 4)  # 4 eigenvalues < min_evals 8


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def lora_pair(tmp_path):
    """A base and a fine-tune: a rank-2 update in block 3 only, and a changed norm weight."""
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(48, 32, generator=g) for i in range(4)}
    base["model.layers.0.norm.weight"] = torch.ones(32)
    ft = {k: v.clone() for k, v in base.items()}
    ft["model.layers.3.mlp.weight"] += 0.3 * torch.randn(48, 2, generator=g) @ torch.randn(2, 32, generator=g)
    ft["model.layers.0.norm.weight"] += 0.01
    ft["extra.weight"] = torch.randn(16, 16, generator=g)
    return wl.save_state_dict(base, tmp_path / "base"), wl.save_state_dict(ft, tmp_path / "ft")


def test_analyze_module_rows_and_summary(net):
    res = analyze(net, show_progress=False)
    assert isinstance(res, InspectResult) and isinstance(res, list)
    rows = {r["name"]: r for r in res}
    assert set(rows) == {"embed.weight", "conv.weight", "point.weight", "head.weight",
                         *(f"blocks.{i}.weight" for i in range(4))}
    assert rows["head.weight"]["tied_to"] == "embed.weight"
    assert rows["head.weight"]["alpha"] == rows["embed.weight"]["alpha"]
    conv = rows["conv.weight"]
    assert conv["kind"] == "conv2d" and conv["rf"] == 9 and conv["num_evals"] == 8 * 9
    assert "filter_orthogonality" in conv and "filter_sparsity" not in rows["point.weight"]  # 1x1: no filters
    for r in res:
        for key in ("shape", "alpha", "alpha_weighted", "ks_distance", "stable_rank", "effective_rank",
                    "numerical_rank", "frobenius_norm", "spectral_norm", "log_norm", "num_pl_spikes", "warnings"):
            assert key in r
    s = res.summary
    assert s["layers"] == 8 and {x["name"] for x in s["skipped"]} == {"small.weight"}
    assert s["tied"] == {"head.weight": "embed.weight"} and s["median_alpha"] > 1
    assert res.diff == [] and "diff" not in s


def test_threads_do_not_change_the_numbers(lora_pair):
    base, ft = lora_pair
    one = analyze(ft, base=base, threads=1, show_progress=False)
    two = analyze(ft, base=base, threads=3, show_progress=False)
    assert list(one) == list(two) and list(one.diff) == list(two.diff)
    assert two.summary["threads"] == 3


def test_to_pandas_and_strict_json(net, tmp_path):
    res = analyze(net, show_progress=False)
    pd = pytest.importorskip("pandas")
    df = res.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(res) and "alpha" in df.columns
    text = res.to_json(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert json.loads(text) == doc and set(doc) == {"layers", "diff", "summary"}


def test_diff_finds_the_low_rank_update(lora_pair):
    base, ft = lora_pair
    res = analyze(ft, base=base, show_progress=False)
    d = {r["name"]: r for r in res.diff}
    changed = d["model.layers.3.mlp.weight"]
    assert changed["status"] == "changed" and changed["rel_change"] > 0.05
    assert changed["delta_numerical_rank"] == 2 and 1 <= changed["delta_effective_rank"] <= 2
    for i in range(3):
        assert d[f"model.layers.{i}.mlp.weight"]["status"] == "unchanged"
    assert d["model.layers.0.norm.weight"]["kind"] == "other" and d["model.layers.0.norm.weight"]["status"] == "changed"
    assert d["extra.weight"]["status"] == "only in model"
    s = res.summary["diff"]
    assert s["changed"] == 2 and s["unchanged"] == 3 and s["only_in_model"] == ["extra.weight"]
    assert s["most_changed"][0]["name"] == "model.layers.3.mlp.weight"
    assert [p["depth"] for p in s["per_depth"]] == [0, 1, 2, 3]
    assert s["depth_verdict"].startswith("deep layers changed")
    assert set(s["intruders"]["sweep"]) == {f"{e / 10:g}" for e in range(1, 10)}


def test_diff_rank_one_spike_one_intruder_noise_none():
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    q2, _ = np.linalg.qr(rng.standard_normal((512, 256)))
    s = 10 * 0.97 ** np.arange(256)
    w0 = (q1 * s) @ q2.T
    u, v = rng.standard_normal(256), rng.standard_normal(512)
    spike = w0 + 5 * s[0] * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    noise = w0 + 0.01 * rng.standard_normal(w0.shape)
    t = lambda a: torch.from_numpy(a).float()  # noqa: E731
    base = {"a.weight": t(w0), "b.weight": t(w0)}
    res = analyze({"a.weight": t(spike), "b.weight": t(noise)}, base=base, show_progress=False)
    d = {r["name"]: r for r in res.diff}
    assert d["a.weight"]["intruders"] == 1 and d["b.weight"]["intruders"] == 0
    assert d["a.weight"]["delta_numerical_rank"] == 1
    assert res.summary["diff"]["intruders"]["total"] == 1


def test_options_are_validated(net):
    with pytest.raises(wl.ConfigError, match="regular expression"):
        analyze(net, include="(", show_progress=False)
    with pytest.raises(wl.ConfigError):
        analyze(net, k=0, show_progress=False)
    with pytest.raises(wl.ConfigError, match="cannot inspect"):
        analyze(42)
    res = analyze(net, include=r"^blocks\.", show_progress=False)
    assert [r["name"] for r in res] == [f"blocks.{i}.weight" for i in range(4)]


def test_registered_methods(lora_pair, net, tmp_path):
    base, ft = lora_pair
    names = {s.name: s for s in wl.list_methods("inspect")}
    assert {"spectral", "diff", "filters"} <= set(names)
    assert all(names[n].kind == "report" and names[n].regime.value == "streaming" for n in ("spectral", "diff"))
    with wl.open_checkpoint(ft) as ck:
        rep = names["spectral"].fn(ck, names["spectral"].make_config({}), show_progress=False)
        assert set(rep) == {"layers", "summary"} and len(rep["layers"]) == 5
        drep = names["diff"].fn(ck, names["diff"].make_config({"base": str(base), "k": 4}), show_progress=False)
        assert drep["summary"]["changed"] == 2
        json.dumps(drep)
    with pytest.raises(wl.ConfigError):
        names["diff"].make_config({})  # base is required
    p = wl.save_state_dict({k: v.detach() for k, v in net.state_dict().items()}, tmp_path / "net")
    with wl.open_checkpoint(p) as ck:
        frep = names["filters"].fn(ck, names["filters"].make_config({}), show_progress=False)
    assert [r["name"] for r in frep["layers"]] == ["conv.weight"]


def test_cli_json_report_and_errors(lora_pair, tmp_path, capsys):
    base, ft = lora_pair
    out, html = tmp_path / "o.json", tmp_path / "r.html"
    assert main(["inspect", str(ft), "--base", str(base), "--json", str(out), "--report", str(html)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"layers", "diff", "summary"}
    assert {"name", "shape", "alpha", "stable_rank"} <= set(doc["layers"][0])
    printed = capsys.readouterr()
    assert "most changed matrices" in printed.out and "only in the model" in printed.err
    assert main(["inspect", str(ft), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["diff"] == []
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
    assert main(["inspect", str(ft), "--report", str(tmp_path)]) == 1  # a folder
    assert main(["inspect", str(ft), "--include", "("]) == 1


def test_html_report_is_self_contained(lora_pair, net, tmp_path):
    base, ft = lora_pair
    p = analyze(ft, base=base, show_progress=False).write_html(tmp_path / "diff.html")
    q = analyze(net, show_progress=False).write_html(tmp_path / "net.html", plot_layers=["conv.weight"])
    for path in (p, q):
        text = path.read_text()
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
        # nothing is fetched: no external scripts, styles, images or fonts
        assert not re.search(r"<script[^>]+src=|<link\b|<img\b|@import|url\(", text)
        assert set(re.findall(r"https?://[^\"' ]+", text)) <= {"http://www.w3.org/2000/svg"}
        assert "<svg" in text and "wlSort" in text
    diff_text = p.read_text()
    assert "intruder dimensions per matrix" in diff_text and "Per-tensor changes" in diff_text
    net_text = q.read_text()
    assert "Convolution filters" in net_text and "conv.weight" in net_text and "fitted power law" in net_text


def test_report_is_a_list_of_sections(net, tmp_path, monkeypatch):
    from weightlab.inspect import report

    res = analyze(net, show_progress=False)
    monkeypatch.setattr(report, "SECTIONS", list(report.SECTIONS))
    report.add_section("extra", lambda ctx: f"<h2>Extra</h2><p>{len(ctx.rows)} rows</p>", before="layers")
    report.add_section("empty", lambda ctx: None)
    html = res.write_html(tmp_path / "r.html").read_text()
    assert "<section id='wl-extra'><h2>Extra</h2><p>8 rows</p></section>" in html
    assert html.index("wl-extra") < html.index("wl-layers") and "wl-empty" not in html
    only = res.write_html(tmp_path / "s.html", sections=["summary", "extra"]).read_text()
    assert "wl-summary" in only and "wl-extra" in only and "wl-layers" not in only
    with pytest.raises(wl.ConfigError, match="unknown report section"):
        res.write_html(tmp_path / "t.html", sections=["nope"])


def test_recipe_steps_spectral_and_diff_after_a_cast(lora_pair, tmp_path):
    """A recipe can inspect what its own transform did: cast to bf16, then diff against the input."""
    base, ft = lora_pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {ft}
output: {tmp_path / 'out'}
steps:
  - {{family: compress, method: cast, params: {{dtype: bfloat16}}}}
  - {{family: inspect, method: spectral}}
  - {{family: inspect, method: diff, params: {{base: {ft}, k: 4}}}}
""")
    assert main(["run", str(recipe)]) == 0
    spec = json.loads((tmp_path / "out" / "report-02-inspect-spectral.json").read_text())
    assert {r["dtype"] for r in spec["layers"]} == {"bfloat16"}
    diff = json.loads((tmp_path / "out" / "report-03-inspect-diff.json").read_text())
    mats = [r for r in diff["diff"] if r["kind"] != "other" and r["status"] == "changed"]
    assert mats and all(r["intruders"] == 0 and not r["delta_above_rounding"] for r in mats)
    assert diff["summary"]["total_rel_change"] < 4e-3  # bf16 rounding: at most 2^-8 relative
