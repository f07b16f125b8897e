"""HTML for neuron and head analyses: standalone pages, and sections of the inspect report when attached."""
from __future__ import annotations

import html

_PAGE = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
# width:auto: inside the inspect report, whose tables are 100% wide, the heat maps still sit side by side
_CSS = """table.hm{border-collapse:collapse;font-size:11px;margin:0.5em 1.5em 1.5em 0;display:inline-table;
vertical-align:top;width:auto}
table.hm td,table.hm th{border:1px solid #fff;padding:2px 4px;text-align:center;min-width:2.4em}
td.d{outline:2px solid #222;outline-offset:-2px;font-weight:bold} .small{color:#666;font-size:12px}
table.t{border-collapse:collapse;font-size:12px;width:auto}
table.t td,table.t th{border-bottom:1px solid #ddd;padding:2px 8px}"""


def _cell(r: dict) -> str:
    m = r["sink_mass"]
    bg = f"rgb({255 - int(90 * m)},{255 - int(200 * m)},{255 - int(200 * m)})"
    d = "" if r["rel_dloss"] is None else f"{100 * r['rel_dloss']:+.1f}%"
    tip = (f"L{r['layer']} H{r['head']}: first-token mass {m:.2f}, row entropy {r['row_entropy']:.2f}, value drain "
           f"{r['drain_ratio']:.2f}, loss change {d or 'not tested'}, {r['state']}")
    cls = ' class="d"' if r["state"] == "dormant" else ""
    return f'<td{cls} style="background:{bg}" title="{html.escape(tip)}">{m:.2f}<br>{d}</td>'


def render_heads(report, standalone: bool = True, title: str = "Attention sinks and dormant heads") -> str:
    out = [f"<h2>{html.escape(title)}</h2>",
           '<p class="small">Cell: mean attention of the head on the first token (red = sink) and the loss change '
           "when its attention is moved entirely to the first token (relative to the domain loss). Outlined: dormant "
           f"(sink and |change| &lt; {100 * report.config.get('dormant_threshold', 0.01):g}%). Dormant test: "
           f"{html.escape(str(report.config.get('dormant_test')))}. Thresholds are weightlab's choice.</p>"]
    for dom, info in report.domains.items():
        rows = [r for r in report.heads if r["domain"] == dom]
        n_heads = max(r["head"] for r in rows) + 1
        grid: dict[int, list] = {}
        for r in rows:
            grid.setdefault(r["layer"], [None] * n_heads)[r["head"]] = r
        head = "".join(f"<th>H{h}</th>" for h in range(n_heads))
        body = "".join(f"<tr><th>L{li}</th>{''.join(_cell(r) for r in cells)}</tr>"
                       for li, cells in sorted(grid.items()))
        out.append(f'<table class="hm"><caption><b>{html.escape(dom)}</b>: loss {info["loss"]:.3f}, '
                   f'{info["tokens"]} tokens, {info["sinks"]} sinks, {info["dormant"]} dormant</caption>'
                   f"<tr><th></th>{head}</tr>{body}</table>")
    doms = list(report.domains)
    lrows = {(r["domain"], r["layer"]): r for r in report.layers}
    n_layers = max(r["layer"] for r in report.layers) + 1
    hdr = "".join(f"<th>{html.escape(d)}: first / median / max other</th>" for d in doms)
    trs = "".join(
        f"<tr><td>L{li}</td>" + "".join(
            f"<td>{lrows[(d, li)]['resid_first']:.0f} / {lrows[(d, li)]['resid_median']:.0f} / "
            f"{lrows[(d, li)]['resid_max']:.0f}</td>" for d in doms) + "</tr>" for li in range(n_layers))
    out.append('<h3>Residual-stream norms after each layer</h3>'
               f'<table class="t"><tr><th>layer</th>{hdr}</tr>{trs}</table>')
    body = "\n".join(out)
    if not standalone:
        return f"<style>{_CSS}</style>\n{body}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_PAGE}\n{_CSS}</style></head><body>{body}</body></html>")


def render_neurons(rows: list[dict], standalone: bool = True, title: str = "Feature neurons",
                   note: str = "") -> str:
    """rows as from NeuronMap.rows(tokenizer) / find_neurons: [{layer, neuron, top_tokens, score}]."""
    trs = "".join(f"<tr><td>{r['layer']}</td><td>{r['neuron']}</td><td>{r['score']:.4f}</td><td>"
                  + " ".join(f"<code>{html.escape(repr(t))}</code>" for t in r["top_tokens"]) + "</td></tr>"
                  for r in rows)
    body = (f"<h2>{html.escape(title)}</h2><p class='small'>{html.escape(note)}</p>"
            f"<table class='t'><tr><th>layer</th><th>neuron</th><th>score</th><th>top tokens</th></tr>{trs}</table>")
    if not standalone:
        return f"<style>{_CSS}</style>\n{body}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_PAGE}\n{_CSS}</style></head><body>{body}</body></html>")


def attach(result, *, heads=None, neurons: list[dict] | None = None, neurons_note: str = ""):
    """Put a heads report and/or neuron rows into an inspect result so its HTML report shows them
    (sections 'heads' and 'neurons'); returns the result."""
    if heads is not None:
        result.heads_report = heads
    if neurons is not None:
        result.neuron_rows = (neurons, neurons_note)
    return result


def _heads_section(ctx):
    rep = getattr(ctx.result, "heads_report", None)
    return None if rep is None else render_heads(rep, standalone=False)


def _neurons_section(ctx):
    got = getattr(ctx.result, "neuron_rows", None)
    return None if got is None else render_neurons(got[0], standalone=False, note=got[1])


def _register() -> None:
    from .report import add_section

    add_section("neurons", _neurons_section)
    add_section("heads", _heads_section)


_register()
