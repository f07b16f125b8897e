"""Summaries of an inspect pass: model-wide means and medians, and what a diff changed where."""
from __future__ import annotations

import math

import numpy as np

from ..tensor import spectral as S

WW_MEAN_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
                   "mp_softrank")
EPS_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _median(vals) -> float | None:
    v = sorted(x for x in vals if x is not None and math.isfinite(x))
    return float(np.median(v)) if v else None


def spectral_summary(rows: list[dict], skipped: list[dict]) -> dict:
    fitted = [r for r in rows if r.get("alpha") is not None]
    by_alpha = sorted(fitted, key=lambda r: r["alpha"])
    s: dict[str, Any] = {
        "layers": len(rows),
        "fitted": len(fitted),
        "failed_fits": [r["name"] for r in rows if r.get("fit") == "failed"],
        "skipped": skipped,
        "mean": {k: _mean(r.get(k) for r in rows) for k in WW_MEAN_METRICS},
        "median_alpha": _median(r.get("alpha") for r in rows),
        "alpha_below_2": [r["name"] for r in by_alpha if r["alpha"] < S.ALPHA_LOW],
        "alpha_above_6": [r["name"] for r in by_alpha if r["alpha"] > S.ALPHA_HIGH],
        "lowest_alpha": [{"name": r["name"], "alpha": r["alpha"]} for r in by_alpha[:5]],
        "highest_alpha": [{"name": r["name"], "alpha": r["alpha"]} for r in by_alpha[::-1][:5]],
        "rank_deficient": [r["name"] for r in rows if r.get("numerical_rank") is not None
                           and r["numerical_rank"] < min(r["shape"][0], int(np.prod(r["shape"][1:])))],
        "layers_with_warnings": sum(1 for r in rows if r.get("warnings")),
        "tied": {r["name"]: r["tied_to"] for r in rows if r.get("tied_to")},
    }
    conv = [r for r in rows if "filter_sparsity" in r]
    if conv:
        s["filters"] = {"layers": len(conv),
                        "mean_sparsity": _mean(r["filter_sparsity"] for r in conv),
                        "mean_orthogonality": _mean(r.get("filter_orthogonality") for r in conv),
                        "flagged": [{"name": r["name"], "flags": r["filter_flags"]} for r in conv
                                    if r.get("filter_flags")]}
    return s


def diff_summary(drows: list[dict], opts: DiffOptions, only_in_base: list[str]) -> dict:
    compared = [r for r in drows if r.get("status") in ("changed", "unchanged")]
    changed = [r for r in compared if r["status"] == "changed"]
    mats = [r for r in compared if r["kind"] != "other" and r.get("rel_change") is not None]
    tot_d = math.sqrt(sum((r.get("delta_norm") or 0.0) ** 2 for r in compared))
    tot_b = math.sqrt(sum((r.get("base_norm") or 0.0) ** 2 for r in compared))
    most = sorted(mats, key=lambda r: -r["rel_change"])[:10]
    out: dict[str, Any] = {
        "compared": len(compared),
        "changed": len(changed),
        "unchanged": len(compared) - len(changed),
        "only_in_model": [r["name"] for r in drows if r.get("status") == "only in model"],
        "only_in_base": only_in_base,
        "shape_mismatch": [r["name"] for r in drows if r.get("status") == "shape mismatch"],
        "non_finite": [r["name"] for r in drows if str(r.get("status", "")).startswith("non-finite")],
        "total_rel_change": tot_d / tot_b if tot_b > 0 else None,
        "most_changed": [{"name": r["name"], "rel_change": r["rel_change"], "intruders": r.get("intruders")}
                         for r in most],
    }
    # depth profile: mean relative change of the matrices of each block, and shallow/middle/deep thirds
    depths = sorted({r["depth"] for r in mats if r.get("depth") is not None})
    if depths:
        per = []
        for d in depths:
            rs = [r for r in mats if r.get("depth") == d]
            per.append({"depth": d, "mean_rel_change": _mean(r["rel_change"] for r in rs),
                        "intruders": sum(r.get("intruders") or 0 for r in rs), "matrices": len(rs)})
        out["per_depth"] = per
        if len(depths) >= 3:
            lo, hi = depths[0], depths[-1]
            span = hi - lo + 1
            thirds = {"shallow": [], "middle": [], "deep": []}
            for p in per:
                pos = (p["depth"] - lo) / span
                key = "shallow" if pos < 1 / 3 else ("middle" if pos < 2 / 3 else "deep")
                thirds[key].append(p["mean_rel_change"])
            t = {k: _mean(v) for k, v in thirds.items()}
            out["by_depth"] = t
            sh, dp = t["shallow"], t["deep"]
            if sh is not None and dp is not None:
                if sh == 0 and dp == 0:
                    verdict = "neither shallow nor deep blocks changed"
                elif sh == 0:
                    verdict = "deep layers changed, shallow ones did not"
                elif dp == 0:
                    verdict = "shallow layers changed, deep ones did not"
                else:
                    r = dp / sh
                    verdict = (f"deep layers changed {r:.2f}x as much as shallow ones" if r >= 1.25 else
                               f"shallow layers changed {1 / r:.2f}x as much as deep ones" if r <= 0.8 else
                               "changes are spread evenly over depth")
                out["depth_verdict"] = verdict
    others = [r for r in compared if r["kind"] == "other" and r.get("depth") is None]
    if others:
        out["outside_blocks"] = [{"name": r["name"], "rel_change": r.get("rel_change")} for r in others]
    mc = [r.get("intruder_max_cos") or [] for r in mats]
    out["intruders"] = {"k": opts.k, "eps": opts.eps, "total": sum(r.get("intruders") or 0 for r in mats),
                        "layers_with_intruders": sum(1 for r in mats if (r.get("intruders") or 0) > 0),
                        "sweep": {f"{e:g}": int(sum(sum(1 for c in cs if c < e) for cs in mc)) for e in EPS_SWEEP}}
    return out
