"""Demo section: spectral inspection of SmolLM2 (and, when the bf16 cast is there, what the cast changed)."""
from __future__ import annotations


def inspect_section(ctx):
    """Analyse ctx.model_path; write inspect.html and inspect.json into ctx.work. Returns (result dict, markdown)."""
    from ..inspect import analyze

    res = analyze(ctx.model_path)
    s = res.summary
    html = res.write_html(ctx.work / "inspect.html", title="weightlab inspect: SmolLM2-135M-Instruct")
    res.to_json(ctx.work / "inspect.json")
    mean = s["mean"]
    out = {"layers": s["layers"], "median_alpha": s["median_alpha"], "mean": mean,
           "alpha_below_2": len(s["alpha_below_2"]), "alpha_above_6": len(s["alpha_above_6"]),
           "failed_fits": len(s["failed_fits"]), "rank_deficient": len(s["rank_deficient"]),
           "analysis_seconds": s["seconds"], "threads": s["threads"], "report": html.name, "json": "inspect.json"}
    by = sorted((r for r in res if r.get("alpha") is not None), key=lambda r: r["alpha"])
    rows = "\n".join(f"| `{r['name']}` | {r['alpha']:.2f} | {r['ks_distance']:.3f} | {r['num_pl_spikes']} | "
                     f"{r['effective_rank']:.0f} / {min(r['shape'])} |" for r in by[:3] + by[-3:])
    # the role of each matrix in a block: median alpha per projection type
    roles: dict[str, list[float]] = {}
    for r in by:
        roles.setdefault(r["name"].split(".")[-2], []).append(r["alpha"])
    role_txt = ", ".join(f"{k} {sorted(v)[len(v) // 2]:.2f}" for k, v in sorted(roles.items(), key=lambda kv: kv[0]))
    out["median_alpha_by_role"] = {k: sorted(v)[len(v) // 2] for k, v in roles.items()}
    text = (f"`weightlab inspect` analysed {s['layers']} weight matrices in {s['seconds']:.1f} s "
            f"({s['threads']} threads, one float64 Gram eigendecomposition per matrix, no model built): "
            f"median power-law alpha **{s['median_alpha']:.2f}** (mean {mean['alpha']:.2f}, alpha_weighted "
            f"{mean['alpha_weighted']:.2f}, log_norm {mean['log_norm']:.2f}); {len(s['alpha_below_2'])} matrices "
            f"have alpha < 2 and {len(s['alpha_above_6'])} alpha > 6 (WeightWatcher's well-trained range is 2-6); "
            f"{len(s['rank_deficient'])} are numerically rank-deficient. "
            f"Median alpha by role: {role_txt}. "
            f"Report: `inspect.html` (charts, spectra with the fitted power law, sortable table); numbers: "
            f"`inspect.json`.\n\n| matrix | alpha | KS D | tail size | effective rank |\n|---|---|---|---|---|\n{rows}")
    cast = ctx.work / "smollm2-bf16"
    if (cast / "config.json").is_file():
        d = analyze(cast, base=ctx.model_path, include=r"layers\.(0|15|29)\.", show_progress=False)
        ds = d.summary["diff"]
        fp32 = {r["name"]: r.get("alpha") for r in res}
        moves = [abs(r["alpha"] - fp32[r["name"]]) for r in d
                 if r.get("alpha") is not None and fp32.get(r["name"]) is not None]
        out["bf16_diff"] = {"matrices": len([r for r in d.diff if r["kind"] != "other"]),
                            "total_rel_change": ds["total_rel_change"], "intruders": ds["intruders"]["total"],
                            "max_alpha_change": max(moves) if moves else None}
        above = sum(1 for r in d.diff if r.get("delta_above_rounding"))
        text += (f"\n\nAgainst the fp32 original, the bf16 cast (blocks 0, 15, 29) changes the weights by "
                 f"{ds['total_rel_change']:.2e} relative, with {ds['intruders']['total']} intruder dimensions and "
                 f"{above} matrices whose change exceeds bf16 rounding"
                 + (f"; alpha moves by at most {max(moves):.3f}." if moves else "."))
    return out, text
