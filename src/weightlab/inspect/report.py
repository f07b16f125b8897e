"""The inspect report: one self-contained HTML file (inline CSS, SVG and a few lines of JS; no network)."""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Callable

from .._version import __version__
from ..errors import ConfigError
from ..tensor.spectral import log_histogram
from . import _svg

LAYER_COLUMNS = [
    ("name", "layer", None), ("shape", "shape", None), ("alpha", "alpha", 3), ("alpha_weighted", "alpha weighted", 3),
    ("ks_distance", "KS D", 3), ("num_pl_spikes", "PL tail", 0), ("log_norm", "log norm", 3),
    ("log_spectral_norm", "log spectral", 3), ("stable_rank", "stable rank", 1), ("effective_rank", "eff. rank", 1),
    ("numerical_rank", "num. rank", 0), ("spectral_norm", "spectral norm", 3), ("frobenius_norm", "Frobenius", 3),
    ("num_spikes", "MP spikes", 0), ("mp_softrank", "MP softrank", 3), ("warnings", "warnings", None),
]
FILTER_COLUMNS = [("filter_sparsity", "filter sparsity", 3), ("filter_variance_entropy_norm", "VE norm", 3),
                  ("filter_orthogonality", "orthogonality", 3)]
DIFF_COLUMNS = [
    ("name", "tensor", None), ("shape", "shape", None), ("rel_change", "rel. change", 4), ("delta_norm", "|delta|", 4),
    ("delta_effective_rank", "delta eff. rank", 1), ("delta_numerical_rank", "delta num. rank", 0),
    ("intruders", "intruders", 0), ("change_topk_cos", "cos top-k", 3), ("change_topk_left", "left top-k", 3),
    ("spectral_norm_change", "sigma1 change", 4), ("status", "status", None),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1a1a1a;background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#c8d1dc;font-size:13px}main{padding:18px 28px;max-width:1400px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;
padding:10px 14px;min-width:120px}.card .v{font-size:20px;font-weight:600}.card .k{font-size:12px;color:#5a6570}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.panel{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:6px}
table{border-collapse:collapse;background:#fff;font-size:12px;width:100%}th,td{border:1px solid #e3e6ea;padding:3px 6px;
text-align:right;white-space:nowrap}th{background:#eef1f4}
.tablewrap th{cursor:pointer;position:sticky;top:0;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}td.l,th.l{text-align:left}
tr.warn td:first-child{border-left:3px solid #e8a33d}.tablewrap{max-height:640px;overflow:auto;border:1px solid #dde1e6}
.note{font-size:13px;color:#3d4852;max-width:1100px;line-height:1.45}.warnlist{font-size:13px;max-height:260px;
overflow:auto;background:#fff;border:1px solid #dde1e6;padding:8px 14px}input.filter{margin:6px 0;padding:4px 8px;
width:320px;border:1px solid #c5ccd3;border-radius:4px}code{background:#eef1f4;padding:0 3px;border-radius:3px}
"""

JS = """
function wlSort(th){const table=th.closest('table');const tbody=table.tBodies[0];const idx=[...th.parentNode.children]
.indexOf(th);const asc=!th.classList.contains('sorted-asc');[...th.parentNode.children].forEach(h=>h.classList.remove(
'sorted-asc','sorted-desc'));th.classList.add(asc?'sorted-asc':'sorted-desc');const rows=[...tbody.rows];const key=r=>{
const c=r.cells[idx];const v=c.dataset.v;if(v!==undefined&&v!==''){return parseFloat(v);}return c.textContent;};
rows.sort((a,b)=>{const x=key(a),y=key(b);const nx=typeof x==='number'&&!isNaN(x),ny=typeof y==='number'&&!isNaN(y);
if(nx&&ny)return asc?x-y:y-x;if(nx)return -1;if(ny)return 1;return asc?String(x).localeCompare(String(y)):String(y)
.localeCompare(String(x));});rows.forEach(r=>tbody.appendChild(r));}
function wlFilter(inp,id){const q=inp.value.toLowerCase();for(const r of document.getElementById(id).tBodies[0].rows)
{r.style.display=r.cells[0].textContent.toLowerCase().includes(q)?'':'none';}}
document.addEventListener('DOMContentLoaded',()=>{document.querySelectorAll('.tablewrap thead th').forEach(th=>
th.addEventListener('click',()=>wlSort(th)));});
"""


def _num(v, digits):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "", ""
    if isinstance(v, bool):
        return str(v), ""
    if isinstance(v, (int, float)):
        if digits == 0:
            return f"{v:,.0f}", repr(float(v))
        a = abs(v)
        txt = f"{v:.{digits}e}" if a and (a >= 1e6 or a < 10 ** (-digits)) else f"{v:,.{digits}f}"
        return txt, repr(float(v))
    return escape(str(v)), ""


def _cell(key, v, digits):
    if key == "shape":
        return f'<td class="l">{"x".join(map(str, v or []))}</td>'
    if key == "warnings":
        ws = v or []
        tip = escape(" | ".join(ws))
        return f'<td class="l" data-v="{len(ws)}" title="{tip}">{len(ws) if ws else ""}' \
               f'{(" - " + escape(ws[0][:60])) if ws else ""}</td>'
    if key in ("name", "status"):
        return f'<td class="l">{escape(str(v if v is not None else ""))}</td>'
    txt, val = _num(v, digits if digits is not None else 3)
    return f'<td data-v="{val}">{txt}</td>'


def _table(rows, cols, table_id, warn_key="warnings") -> str:
    """A sortable table with a name filter; ``table_id`` must differ from every section's id (wl-NAME), or
    the filter's getElementById finds the section instead."""
    head = "".join(f'<th class="{"l" if k in ("name", "shape", "warnings", "status") else ""}">{escape(lab)}</th>'
                   for k, lab, _ in cols)
    body = []
    for r in rows:
        cls = ' class="warn"' if r.get(warn_key) else ""
        body.append(f"<tr{cls}>" + "".join(_cell(k, r.get(k), d) for k, _, d in cols) + "</tr>")
    return (f'<input class="filter" placeholder="filter by name" oninput="wlFilter(this,\'{table_id}\')">'
            f'<div class="tablewrap"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>")


def _group(name: str) -> str:
    """A layer's role for colouring: its last name component that is not 'weight' or a number."""
    parts = [p for p in re.split(r"[./]", name) if p and p != "weight" and not p.isdigit()]
    return parts[-1].lstrip("_") if parts else name


def _groups(names) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in names:
        g = _group(n)
        if g not in out:
            out[g] = _svg.PALETTE[len(out) % len(_svg.PALETTE)]
    if len(out) > len(_svg.PALETTE):  # too many roles to tell apart: one colour
        return {g: _svg.PALETTE[0] for g in out}
    return out


def _card(k, v) -> str:
    return f'<div class="card"><div class="v">{escape(str(v))}</div><div class="k">{escape(k)}</div></div>'


def _f(v, d=3):
    return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def choose_plot_layers(rows: list[dict], limit: int = 6) -> list[str]:
    fitted = [r for r in rows if r.get("alpha") is not None]
    if not fitted:
        return []
    by = sorted(fitted, key=lambda r: r["alpha"])
    picks = [by[0], by[-1], by[len(by) // 2], fitted[0], fitted[-1],
             max(fitted, key=lambda r: r.get("spectral_norm") or 0)]
    out = []
    for r in picks:
        if r["name"] not in out:
            out.append(r["name"])
    return out[:limit]


@dataclass
class ReportContext:
    """What a report section sees: the result and a few things computed once for all sections."""

    result: Any
    rows: list[dict]
    drows: list[dict]
    summary: dict
    groups: dict[str, str]  # layer role -> colour
    index: dict[str, int]  # layer name -> position in ``rows``
    plot_layers: list[str] | None = None


# A section is ``fn(ctx) -> html or None`` (None: nothing to show). The report is these in order;
# other analyses (e.g. neuron or head diagnostics) add theirs with ``add_section``.
SECTIONS: list[tuple[str, Callable[[ReportContext], str | None]]] = []


def add_section(name: str, fn: Callable[[ReportContext], str | None], *, before: str | None = None) -> None:
    """Register (or replace) a report section; ``before`` names the section it goes in front of (default: last)."""
    for i, (n, _) in enumerate(SECTIONS):
        if n == name:
            del SECTIONS[i]
            break
    names = [n for n, _ in SECTIONS]
    at = names.index(before) if before in names else len(SECTIONS)
    SECTIONS.insert(at, (name, fn))


def _summary_section(ctx: ReportContext) -> str:
    s, mean = ctx.summary, ctx.summary.get("mean", {})
    out = ["<h2>Summary</h2><div class='cards'>"]
    out += [_card("weight matrices analysed", s.get("layers", 0)), _card("median alpha", _f(s.get("median_alpha"))),
            _card("mean alpha", _f(mean.get("alpha"))), _card("mean alpha_weighted", _f(mean.get("alpha_weighted"))),
            _card("mean log_norm", _f(mean.get("log_norm"))), _card("mean stable rank", _f(mean.get("stable_rank"), 1)),
            _card("alpha < 2", len(s.get("alpha_below_2", []))), _card("alpha > 6", len(s.get("alpha_above_6", []))),
            _card("failed fits", len(s.get("failed_fits", []))),
            _card("layers with warnings", s.get("layers_with_warnings", 0))]
    d = s.get("diff")
    if d:
        out += [_card("relative change (all)", _f(d.get("total_rel_change"), 5)),
                _card(f"intruders (k={d['intruders']['k']}, eps={d['intruders']['eps']:g})", d["intruders"]["total"]),
                _card("tensors changed", f"{d.get('changed', 0)} / {d.get('compared', 0)}")]
    out.append("</div>")
    out.append("<p class='note'>alpha is the exponent of a power law fitted to the tail of each matrix's eigenvalue "
               "spectrum (eigenvalues of W<sup>T</sup>W), by maximum likelihood with xmin chosen by the smallest "
               "Kolmogorov-Smirnov distance, as WeightWatcher does. WeightWatcher's rule of thumb: alpha between 2 and "
               "6 for well-trained layers; below 2 very heavy-tailed (possibly over-fit), above 6 little learned "
               "structure. alpha_weighted = alpha &middot; log10(lambda_max). Conv kernels: eigenvalues pooled over "
               "the k x k slices; ranks and norms from the c_out x (c_in k k) matrix.</p>")
    if s.get("skipped"):
        sk = s["skipped"]
        out.append(f"<p class='note'>Not analysed ({len(sk)}): " + ", ".join(
            f"<code>{escape(x['name'])}</code> ({escape(x['reason'])})" for x in sk[:12])
                   + (" ..." if len(sk) > 12 else "") + "</p>")
    return "".join(out)


def _metrics_section(ctx: ReportContext) -> str | None:
    rows, groups = ctx.rows, ctx.groups
    if not rows:
        return None

    def pts(key, scale=None):
        res = []
        for r in rows:
            v = r.get(key)
            if v is not None and scale is not None:
                v = scale(r, v)
            tip = f"{r['name']}: {key} = {_f(v, 4) if v is not None else '-'}"
            res.append((ctx.index[r["name"]], v, _group(r["name"]), tip))
        return res

    def rel(r, v):
        return v / max(1, min(r["shape"][0], _prod(r["shape"][1:])))

    charts = [
        _svg.scatter(pts("alpha"), groups, title="alpha (shaded: 2-6)", xlabel="layer (order in checkpoint)",
                     ylabel="alpha", band=(2, 6)),
        _svg.scatter(pts("alpha_weighted"), groups, title="alpha_weighted", xlabel="layer", ylabel="alpha weighted"),
        _svg.scatter(pts("log_spectral_norm"), groups, title="log10 lambda_max", xlabel="layer",
                     ylabel="log spectral norm"),
        _svg.scatter(pts("effective_rank", rel), groups, title="effective rank / min(m, n)", xlabel="layer",
                     ylabel="relative effective rank"),
        _svg.scatter(pts("ks_distance"), groups, title="KS distance of the power-law fit", xlabel="layer",
                     ylabel="D"),
        _svg.scatter(pts("stable_rank", rel), groups, title="stable rank / min(m, n)", xlabel="layer",
                     ylabel="relative stable rank"),
    ]
    return "<h2>Per-layer metrics</h2><div class='grid'>" + "".join(
        f"<div class='panel'>{c}</div>" for c in charts) + "</div>"


def _spectra_section(ctx: ReportContext) -> str | None:
    spectra = getattr(ctx.result, "spectra", {}) or {}
    names = [n for n in (ctx.plot_layers or choose_plot_layers(ctx.rows)) if n in spectra and n in ctx.index]
    panels = []
    for n in names:
        r = ctx.rows[ctx.index[n]]
        h = log_histogram(spectra[n])
        if h is not None:
            panels.append("<div class='panel'>" + _svg.esd_plot(
                h, title=_short(n), alpha=r.get("alpha"), xmin=r.get("xmin"), n_tail=r.get("num_pl_spikes"),
                mp_edge=r.get("mp_bulk_max")) + "</div>")
    if not panels:
        return None
    return ("<h2>Eigenvalue spectra (log-log) with the fitted power law</h2><div class='grid'>" + "".join(panels)
            + "</div><p class='note'>Blue: density of the eigenvalues on log-spaced bins. Red dashed: the fitted "
            "power law p(x) ~ x<sup>-alpha</sup> above xmin (red line), scaled to the share of eigenvalues in "
            "the tail. Orange dotted: the Marchenko-Pastur bulk edge (random-matrix level; eigenvalues above "
            "it are spikes).</p>")


def _filters_section(ctx: ReportContext) -> str | None:
    conv = [r for r in ctx.rows if "filter_sparsity" in r]
    if not conv:
        return None
    cg = _groups(r["name"] for r in conv)
    out = ["<h2>Convolution filters (CNN Filter DB)</h2><div class='grid'>"]
    cidx = {r["name"]: i for i, r in enumerate(conv)}
    for key, lab, band in (("filter_sparsity", "filter sparsity", None),
                           ("filter_variance_entropy_norm", "variance entropy / random level (3x3)", (0.5, 0.9)),
                           ("filter_orthogonality", "orthogonality", None)):
        p = [(cidx[r["name"]], r.get(key), _group(r["name"]), f"{r['name']}: {_f(r.get(key), 4)}") for r in conv]
        out.append("<div class='panel'>" + _svg.scatter(p, cg, title=lab, xlabel="conv layer", ylabel=lab,
                                                        band=band) + "</div>")
    out.append("</div>")
    flagged = [r for r in conv if r.get("filter_flags")]
    if flagged:
        out.append("<div class='warnlist'>" + "".join(
            f"<div><code>{escape(r['name'])}</code>: {escape('; '.join(r['filter_flags']))}</div>"
            for r in flagged) + "</div>")
    return "".join(out)


def _diff_section(ctx: ReportContext) -> str | None:
    d = ctx.summary.get("diff")
    if not d:
        return None
    out = [f"<h2>What changed against the base</h2><p class='note'>Base: <code>{escape(str(d.get('base')))}"
           f"</code>. {d.get('changed', 0)} of {d.get('compared', 0)} tensors changed; relative change over "
           f"all of them {_f(d.get('total_rel_change'), 5)}. {escape(d.get('depth_verdict', ''))}</p>"]
    mats = [r for r in ctx.drows if r.get("kind") != "other" and r.get("rel_change") is not None]
    dg = _groups(r["name"] for r in mats)
    out.append("<div class='grid'>")
    out.append("<div class='panel'>" + _svg.bars(
        [(r["name"], r["rel_change"], _group(r["name"]), f"{r['name']}: {r['rel_change']:.4g}") for r in mats],
        dg, title="relative change ||W - W0||_F / ||W0||_F per matrix", xlabel="matrix (checkpoint order)",
        ylabel="relative change") + "</div>")
    out.append("<div class='panel'>" + _svg.bars(
        [(r["name"], float(r.get("intruders") or 0), _group(r["name"]),
          f"{r['name']}: {r.get('intruders') or 0} intruders") for r in mats], dg,
        title=f"intruder dimensions per matrix (top {d['intruders']['k']}, eps {d['intruders']['eps']:g})",
        xlabel="matrix (checkpoint order)", ylabel="intruders") + "</div>")
    if d.get("per_depth"):
        pdp = d["per_depth"]
        out.append("<div class='panel'>" + _svg.scatter(
            [(p["depth"], p["mean_rel_change"], "mean", f"block {p['depth']}: {_f(p['mean_rel_change'], 5)}, "
              f"{p['intruders']} intruders") for p in pdp], {"mean": _svg.PALETTE[0]},
            title="mean relative change by block (depth)", xlabel="block index", ylabel="relative change",
            connect=True) + "</div>")
    sw = d["intruders"]["sweep"]
    out.append("<div class='panel'>" + _svg.scatter(
        [(float(e), float(c), "count", f"eps {e}: {c} intruders") for e, c in sw.items()],
        {"count": _svg.PALETTE[3]}, title="intruders summed over matrices vs eps", xlabel="eps",
        ylabel="intruders", connect=True) + "</div>")
    out.append("</div>")
    out.append("<p class='note'>Intruder dimension: one of the top-k left singular vectors of the fine-tuned "
               "matrix whose largest |cosine| with every left singular vector of the base is below eps "
               "(Shuttleworth et al. 2024). cos top-k: ||U0<sub>k</sub><sup>T</sup> (W - W0) "
               "V0<sub>k</sub>||<sub>F</sub> / ||W - W0||<sub>F</sub>, the share of the change along the "
               "base's top-k singular directions (a random change of the same size gives about k / sqrt(mn)).</p>")
    out.append("<h2>Per-tensor changes</h2>"
               + _table(ctx.drows, DIFF_COLUMNS, "wl-table-diff", warn_key="intruders"))
    return "".join(out)


def _warnings_section(ctx: ReportContext) -> str | None:
    warned = [r for r in ctx.rows if r.get("warnings")]
    if not warned:
        return None
    return (f"<h2>Warnings ({len(warned)} layers)</h2><div class='warnlist'>" + "".join(
        f"<div><code>{escape(r['name'])}</code>: {escape('; '.join(r['warnings']))}</div>" for r in warned)
            + "</div>")


def _layers_section(ctx: ReportContext) -> str:
    conv = any("filter_sparsity" in r for r in ctx.rows)
    cols = LAYER_COLUMNS + (FILTER_COLUMNS if conv else [])
    return ("<h2>All layers</h2><p class='note'>Click a column header to sort.</p>"
            + _table(ctx.rows, cols, "wl-table-layers"))


for _name, _fn in (("summary", _summary_section), ("metrics", _metrics_section), ("spectra", _spectra_section),
                   ("filters", _filters_section), ("diff", _diff_section), ("warnings", _warnings_section),
                   ("layers", _layers_section)):
    add_section(_name, _fn)


def render(result, *, title: str | None = None, plot_layers: list[str] | None = None,
           sections: list[str] | None = None) -> str:
    """The report as one HTML string; ``sections`` picks registered sections by name (default: all, in order)."""
    rows = list(result)
    s = result.summary
    title = title or f"weightlab inspect: {Path(str(s.get('model', 'model'))).name}"
    ctx = ReportContext(result, rows, list(getattr(result, "diff", [])), s, _groups(r["name"] for r in rows),
                        {r["name"]: i for i, r in enumerate(rows)}, plot_layers)
    known = dict(SECTIONS)
    if sections is not None:
        unknown = [n for n in sections if n not in known]
        if unknown:
            raise ConfigError(f"unknown report section(s) {unknown}; known: {list(known)}")
    chosen = sections if sections is not None else [n for n, _ in SECTIONS]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
           f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style>"
           f"<script>{JS}</script></head><body>",
           f"<header><h1>{escape(title)}</h1><div class='sub'>{escape(str(s.get('model', '')))} &middot; "
           f"weightlab {escape(__version__)} &middot; {when} &middot; {s.get('seconds', 0):.1f} s on "
           f"{s.get('threads', 1)} thread(s)</div></header><main>"]
    for name in chosen:
        html = known[name](ctx)
        if html:
            out.append(f"<section id='wl-{escape(name)}'>{html}</section>")
    out.append("</main></body></html>")
    return "".join(out)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _short(name: str, n: int = 46) -> str:
    name = name.removesuffix(".weight")
    return name if len(name) <= n else "..." + name[-(n - 3):]


def write_report(result, path: str | os.PathLike, *, title: str | None = None,
                 plot_layers: list[str] | None = None, sections: list[str] | None = None) -> Path:
    """Write the report atomically; returns its path."""
    from ..io.atomic import write_file_atomic

    p = Path(path)
    write_file_atomic(p, render(result, title=title, plot_layers=plot_layers, sections=sections))
    return p
