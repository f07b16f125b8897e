"""The HTML report renders in a real browser (headless Chromium): a screenshot with content, and working JS sort.

Skipped when no Chromium is installed (Debian: apt-get install chromium). To look at the page
yourself: WEIGHTLAB_KEEP_SCREENSHOT=/some/dir pytest tests/test_inspect_render.py
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import weightlab as wl
from weightlab.inspect import analyze

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome",
                                                        "google-chrome-stable")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage"]


def chromium(*args, cwd):
    env = {**os.environ, "HOME": str(cwd)}  # a throwaway profile
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={cwd / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.conv.weight": torch.randn(32, 16, 3, 3, generator=g) for i in range(3)}
    base.update({f"blocks.{i}.fc.weight": torch.randn(96, 64, generator=g) for i in range(3)})
    ft = {k: v.clone() for k, v in base.items()}
    ft["blocks.2.fc.weight"] += 2 * torch.randn(96, 1, generator=g) @ torch.randn(1, 64, generator=g)
    ft["blocks.1.conv.weight"] += 0.05 * torch.randn(32, 16, 3, 3, generator=g)
    b = wl.save_state_dict(base, tmp / "base")
    f = wl.save_state_dict(ft, tmp / "ft")
    res = analyze(f, base=b, show_progress=False)
    return res, res.write_html(tmp / "report.html"), tmp


def test_screenshot_has_content(report):
    Image = pytest.importorskip("PIL.Image")
    _, html, tmp = report
    png = tmp / "shot.png"
    r = chromium(f"--screenshot={png}", "--window-size=1400,2600", html.as_uri(), cwd=tmp)
    assert png.is_file() and png.stat().st_size > 20_000, r.stderr[-2000:]
    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 2600)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 200  # charts, text and table, not a blank page
    keep = os.environ.get("WEIGHTLAB_KEEP_SCREENSHOT")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / "inspect-report.png")


def test_table_sorts_in_the_browser(report):
    res, html, tmp = report
    text = html.read_text()
    # click the "rel. change" header of the diff table once (descending after two clicks) after load
    probe = ("<script>document.addEventListener('DOMContentLoaded',()=>{const th=[...document.querySelectorAll("
             "'#wl-diff th')].find(h=>h.textContent==='rel. change');th.click();th.click();"
             "document.body.dataset.sorted=[...document.querySelectorAll('#wl-diff tbody tr')].map(r=>r.cells[0]"
             ".textContent).join('|');});</script></body>")
    page = tmp / "probe.html"
    page.write_text(text.replace("</body>", probe))
    r = chromium("--dump-dom", page.as_uri(), cwd=tmp)
    m = re.search(r'data-sorted="([^"]*)"', r.stdout)
    assert m, r.stderr[-2000:]
    order = m.group(1).split("|")
    want = [d["name"] for d in sorted(res.diff, key=lambda d: -(d.get("rel_change") or 0))]
    assert order[:2] == want[:2] == ["blocks.2.fc.weight", "blocks.1.conv.weight"]
