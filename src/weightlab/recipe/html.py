"""report.html of a recipe run: one row per step (time, memory, size, results), then each step's details."""
from __future__ import annotations

import html
import json

# the scalar results worth a column, in this order, when a step reports them
HEADLINE = ("perplexity", "ppl", "cosine_mean", "accuracy", "heldout_before", "heldout_after", "achieved_sparsity", "sparsity", "sparsity_pattern", "bits",
            "bits_per_weight", "group_size", "scheme", "type", "size_bytes", "tensors", "merged", "method")

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.cached{color:#777}pre{background:#f8f8f8;padding:8px;overflow:auto;max-height:24em}"""


def _flat(d: dict | None, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def headline(rec) -> str:
    """A few key results of one step: its report's (or its model card's) best-known scalars."""
    flat = {**_flat(rec.card), **_flat(rec.result)}
    picked, leaves = [], set()
    for want in HEADLINE:  # top-level keys first, one entry per name
        for k, v in sorted(flat.items(), key=lambda kv: kv[0].count(".")):
            if k.split(".")[-1] == want and want not in leaves and len(picked) < 5:
                picked.append((k, v))
                leaves.add(want)
    return ", ".join(f"{k} = {round(v, 4) if isinstance(v, float) else v}" for k, v in picked)


def report_html(recipe, steps) -> str:
    e = html.escape
    rows = "".join(
        f"<tr class='{r.status}'><td>{r.step}</td><td>{e(r.family)}/{e(r.method)}</td><td>{e(r.status)}</td>"
        f"<td>{r.seconds:.1f}</td><td>{r.peak_rss_mib:,.0f}</td><td>{r.size_bytes / 2**20:,.1f}</td>"
        f"<td>{e(headline(r))}</td></tr>" for r in steps)
    details = "".join(
        f"<h3>Step {r.step}: {e(r.family)}/{e(r.method)}</h3>"
        + (f"<p>artifacts: {e(', '.join(r.artifacts))}</p>" if r.artifacts else "")
        + (f"<pre>{e(json.dumps(r.result, indent=1, default=str)[:20000])}</pre>" if r.result else "")
        for r in steps)
    src = e(recipe.model or "(merge)")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>weightlab recipe</title>"
            f"<style>{STYLE}</style></head><body><h1>weightlab recipe</h1>"
            f"<p>model: {src} &rarr; output: {e(str(recipe.output))}</p>"
            "<table><tr><th>step</th><th>method</th><th>status</th><th>seconds</th>"
            "<th>process peak RSS MiB</th><th>size MiB</th><th>results</th></tr>"
            f"{rows}</table><p>Cached steps show the time, memory and size of the run that made them. Peak RSS is "
            "the process's maximum so far (it never decreases within a run).</p>"
            f"{details}<h2>Recipe</h2><pre>{e(json.dumps(recipe.model_dump(), indent=1))}</pre></body></html>")
