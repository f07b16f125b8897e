"""Connectivity plot (PNG via matplotlib) and a self-contained HTML report (the PNG inlined)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .connect import Connectivity


def plot_paths(res: Connectivity, title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = ["loss"] + (["accuracy"] if "accuracy" in res.before.metrics[0] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for tag, path, style in (("as given", res.before, "--"), ("after weight matching", res.after, "-")):
            if path is not None:
                ax.plot(path.lambdas, path.series(key), style, marker="o", ms=3, label=tag)
        ax.set_xlabel("lambda  (0 = A, 1 = B)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[list], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def html_report(res: Connectivity, title: str, inputs: dict | None = None) -> str:
    png = base64.b64encode(plot_paths(res, title)).decode()
    rows = []
    for tag, p in (("as given", res.before), ("after weight matching", res.after)):
        if p is None:
            continue
        mid = p.midpoint()
        for metric, b in p.barrier.items():
            rows.append([tag, metric, b["reference"], b["linear"], mid.get("loss"), mid.get("accuracy", "")])
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>Barrier <b>reference</b> = max<sub>&lambda;</sub> L(&lambda;) &minus; (L(0)+L(1))/2 (git-re-basin); "
             "<b>linear</b> = max<sub>&lambda;</sub> [L(&lambda;) &minus; ((1&minus;&lambda;)L(0)+&lambda;L(1))]. "
             "&lsquo;error&rsquo; is 1 &minus; accuracy.</p>",
             _table(rows, ["path", "metric", "barrier (reference)", "barrier (linear)", "midpoint loss",
                           "midpoint accuracy"]),
             f'<img alt="loss and accuracy along the path" src="data:image/png;base64,{png}">']
    if res.analysis:
        a = res.analysis
        parts.append("<h2>Singular values and vectors</h2><p>A permutation keeps each layer's singular values "
                     f"(largest relative change {a['max_sv_change']:.2g}) and permutes its singular vectors. "
                     f"Distance ratio ||A &minus; &pi;(B)|| / ||A &minus; B|| = {a['distance_ratio']:.3f}. "
                     "<i>aligned</i>: &sigma;-weighted |&lang;u<sub>A</sub>,u<sub>B</sub>&rang;||&lang;v<sub>A</sub>,"
                     f"v<sub>B</sub>&rang;| of paired triplets; <i>overlap</i>: shared top-{a['k']} left subspace.</p>")
        parts.append(_table([[n, v["sv_change"], v["aligned_before"], v["aligned_after"], v["overlap_before"],
                              v["overlap_after"]] for n, v in a["layers"].items()],
                            ["tensor", "sv change", "aligned before", "aligned after", "overlap before",
                             "overlap after"]))
    if inputs:
        parts.append(f"<h2>Inputs</h2><pre>{html.escape(json.dumps(inputs, indent=1, default=str))}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"


def write_report(res: Connectivity, path: str | Path, title: str, inputs: dict | None = None) -> Path:
    from ..io.atomic import write_file_atomic

    return write_file_atomic(Path(path), html_report(res, title, inputs))
