"""weightlab inspect against WeightWatcher's analyze() on the same weights, side by side in one run.

    .venv/bin/python benchmarks/inspect_vs_weightwatcher.py              # all three models, update RESULTS.md
    .venv/bin/python benchmarks/inspect_vs_weightwatcher.py --models minilm --repeats 1 --no-write

Models (offline zoo): SmolLM2-135M (fp32 HF folder), all-MiniLM-L6-v2 (HF folder), EfficientNet-Lite0 (.pth).

Each tool runs in its own child process (this script with --child), so the wall time includes
its start-up (imports, loading) and the peak RSS is its own:
  WeightWatcher: load the model as an nn.Module (transformers / the zoo's EfficientNet), then
                 ``ww.WeightWatcher(model=m).analyze()`` with default settings;
  weightlab:     ``weightlab.inspect.analyze(path)`` on the checkpoint file or folder (streaming,
                 nothing is built), default settings.
WeightWatcher runs twice per repeat: as installed (OpenBLAS picks its thread count) and with
OPENBLAS_NUM_THREADS=1 (on a busy 2-core machine multi-threaded OpenBLAS can be many times
slower; see the notes). The order alternates between repeats. Each child also reports the time
of the analysis call alone. Alphas are matched by layer name and compared; the
"## Inspect: weightlab vs WeightWatcher" section of benchmarks/RESULTS.md is replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "Inspect: weightlab vs WeightWatcher"
REPRO = ".venv/bin/python benchmarks/inspect_vs_weightwatcher.py"
MODELS = ("smollm2", "minilm", "efficientnet")
LABEL = {"smollm2": "SmolLM2-135M", "minilm": "all-MiniLM-L6-v2", "efficientnet": "EfficientNet-Lite0"}
TARGET_TIME = 0.2
TARGET_ALPHA = 0.05
TOOLS = ("ww", "ww1", "wl")  # WeightWatcher as installed, WeightWatcher with one BLAS thread, weightlab
TOOL_LABEL = {"ww": "WeightWatcher", "ww1": "WeightWatcher, OPENBLAS_NUM_THREADS=1", "wl": "weightlab"}


# ----------------------------------------------------------------------------- children

def model_path(name: str) -> Path:
    import weightlab as wl

    return {"smollm2": wl.zoo.smollm2, "minilm": wl.zoo.minilm,
            "efficientnet": wl.zoo.efficientnet_lite0_path}[name]()


def child_ww(name: str, path: Path, out: Path) -> None:
    t0 = time.perf_counter()
    import contextlib
    import io
    import logging

    import torch
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    t1 = time.perf_counter()
    if name == "efficientnet":
        import weightlab as wl

        model = wl.zoo.efficientnet_lite0()
    else:
        import transformers

        cls = transformers.AutoModelForCausalLM if name == "smollm2" else transformers.AutoModel
        model = cls.from_pretrained(path, dtype=torch.float32)
    model.eval()
    t2 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        details = ww.WeightWatcher(model=model).analyze()
    t3 = time.perf_counter()
    rows = [{"name": r["longname"], "alpha": r["alpha"], "log_norm": r["log_norm"],
             "alpha_weighted": r["alpha_weighted"], "stable_rank": r["stable_rank"], "xmin": r["xmin"],
             "num_pl_spikes": int(r["num_pl_spikes"]), "N": int(r["N"]), "M": int(r["M"]), "rf": r["rf"],
             "layer_type": r["layer_type"]} for r in details.to_dict("records")]
    out.write_text(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "analyze_s": t3 - t2, "rows": rows}))


def child_wl(name: str, path: Path, out: Path) -> None:
    t0 = time.perf_counter()
    from weightlab.inspect import analyze

    t1 = time.perf_counter()
    res = analyze(path, show_progress=False)
    t2 = time.perf_counter()
    rows = [{k: r.get(k) for k in ("name", "alpha", "log_norm", "alpha_weighted", "stable_rank", "xmin",
                                   "num_pl_spikes", "N", "M", "rf", "kind")} for r in res]
    out.write_text(json.dumps({"import_s": t1 - t0, "load_s": 0.0, "analyze_s": t2 - t1, "rows": rows,
                               "threads": res.summary["threads"]}))


# ----------------------------------------------------------------------------- comparison

def compare(ww_rows: list[dict], wl_rows: list[dict]) -> dict:
    ours = {r["name"].removesuffix(".weight"): r for r in wl_rows}
    matched, unmatched = [], []
    for w in ww_rows:
        o = ours.get(w["name"])
        (matched if o is not None else unmatched).append((w, o))
    da = [abs(o["alpha"] - w["alpha"]) for w, o in matched if o["alpha"] is not None and w["alpha"] > 0]
    worst = max(matched, key=lambda p: abs((p[1]["alpha"] or 0) - p[0]["alpha"]), default=(None, None))
    rel = {}
    for key in ("log_norm", "alpha_weighted", "stable_rank", "xmin"):
        # stable_rank of conv layers is defined differently (pooled slices vs the reshaped matrix)
        vals = [abs(o[key] - w[key]) / max(abs(w[key]), 1e-300) for w, o in matched
                if o.get(key) is not None and w.get(key) is not None and (key != "stable_rank" or w["rf"] == 1)]
        rel[key] = max(vals) if vals else None
    spikes_equal = sum(1 for w, o in matched if o["num_pl_spikes"] == w["num_pl_spikes"])
    ww_names = {w["name"] for w in ww_rows}
    return {"ww_layers": len(ww_rows), "wl_layers": len(wl_rows), "matched": len(matched),
            "ww_only": [w["name"] for w, _ in unmatched],
            "wl_only": [n for n in ours if n not in ww_names],
            "median_abs_alpha_diff": statistics.median(da) if da else None,
            "max_abs_alpha_diff": max(da) if da else None,
            "worst_layer": worst[0]["name"] if worst[0] else None,
            "max_rel_diff": rel, "num_pl_spikes_equal": spikes_equal,
            "ww_median_alpha": statistics.median(w["alpha"] for w in ww_rows),
            "wl_median_alpha": statistics.median(r["alpha"] for r in wl_rows if r["alpha"] is not None)}


# ----------------------------------------------------------------------------- driver

def run_tool(tool: str, name: str, path: Path, tmp: Path, rep: int) -> dict:
    out = tmp / f"{tool}-{name}-{rep}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WEIGHTLAB_PROGRESS": "0",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if tool == "ww1":
        env.update({"OPENBLAS_NUM_THREADS": "1"})
    child = "ww" if tool.startswith("ww") else "wl"
    load0 = os.getloadavg()[0]
    r = C.run_measured([C.python_exe(), str(Path(__file__).resolve()), "--child", child, name, str(path), str(out)],
                       env=env, cwd=C.REPO_ROOT).check(f"{tool} on {name}")
    d = json.loads(out.read_text())
    d.update({"wall_s": r.wall_s, "rss_mib": r.peak_rss_mib, "rss_source": r.rss_source, "load1": load0})
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--no-write", action="store_true", help="print the section, do not update RESULTS.md")
    ap.add_argument("--raw", metavar="FILE.json", help="also save every run's measurements and rows here")
    ap.add_argument("--from-raw", metavar="FILE.json", nargs="+",
                    help="re-render the section from --raw files (no runs); a later file's models replace an earlier's")
    ap.add_argument("--note", action="append", help="an extra line for the notes (repeatable)")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "PATH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        tool, name, path, out = a.child
        (child_ww if tool == "ww" else child_wl)(name, Path(path), Path(out))
        return 0

    if a.from_raw:
        results, total, reps = {}, 0.0, set()
        for f in a.from_raw:
            raw = json.loads(Path(f).read_text())
            results.update(raw["results"])
            total += raw["total_s"]
            reps.add(raw["repeats"])
        a.repeats = "/".join(str(r) for r in sorted(reps))
        body = render(a, results, total)
        print(body)
        if not a.no_write:
            C.write_section(SECTION, body)
        return 0
    t_start = time.perf_counter()
    C.log("warming the page cache")
    paths = {m: model_path(m) for m in a.models}  # resolved here: the children get a plain path
    for m in a.models:
        C.warm_page_cache([paths[m]])
    results: dict[str, dict[str, list[dict]]] = {m: {t: [] for t in a.tools} for m in a.models}
    with tempfile.TemporaryDirectory(prefix="wl-inspect-bench-") as tmpd:
        tmp = Path(tmpd)
        for rep in range(a.repeats):
            for m in a.models:
                order = list(a.tools) if rep % 2 == 0 else list(reversed(a.tools))
                for tool in order:
                    d = run_tool(tool, m, paths[m], tmp, rep)
                    results[m][tool].append(d)
                    C.log(f"{m} {tool} rep {rep}: wall {d['wall_s']:.1f} s, analysis {d['analyze_s']:.2f} s, "
                          f"RSS {d['rss_mib']:.0f} MiB (load {d['load1']:.1f})")
    total = time.perf_counter() - t_start
    if a.raw:
        Path(a.raw).write_text(json.dumps({"repeats": a.repeats, "results": results, "total_s": total}))
    body = render(a, results, total)
    print(body)
    if not a.no_write:
        C.write_section(SECTION, body)
        C.log(f"wrote the '{SECTION}' section of {C.RESULTS_MD}")
    return 0


def _tools_line(results) -> str:
    ran = {t for m in results for t, runs in results[m].items() if runs}
    if {"ww", "ww1"} <= ran:
        return "WeightWatcher runs twice per repeat: as installed, and with `OPENBLAS_NUM_THREADS=1`."
    if "ww1" in ran:
        return ("WeightWatcher runs with `OPENBLAS_NUM_THREADS=1` only (its faster setting on this shared machine; "
                "see the notes).")
    return "WeightWatcher runs as installed."


def _floor_sentence(results) -> str:
    """How far weightlab's own start-up alone keeps each model's wall-time ratio from 0."""
    parts = []
    for m in results:
        wl, ww = results[m].get("wl"), results[m].get("ww1") or results[m].get("ww")
        if wl and ww:
            imp = _med(wl, "import_s")
            parts.append(f"{LABEL[m]} {imp:.1f} s = {imp / _med(ww, 'wall_s'):.2f}x WeightWatcher's wall")
    return (": imports alone (median) " + "; ".join(parts) + ", whatever the analysis costs") if parts else ""


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def render(a, results, total_s: float) -> str:
    versions = ", ".join(f"{p} {C.package_version(p)}" for p in ("weightwatcher", "torch", "numpy", "scipy",
                                                                 "transformers", "threadpoolctl"))
    loads = [r["load1"] for m in results for t in results[m] for r in results[m][t]]
    lines = [f"Date: {C.today()}. Machine: {C.machine_line()}. 1-minute load average at the starts of the runs "
             f"{min(loads):.1f}-{max(loads):.1f} on {C.cpu_count()} cores (one child at a time).",
             f"Versions: {versions}, weightlab {C.package_version('weightlab')}.", "",
             "Each tool runs in its own process on the same weights: WeightWatcher loads the model as an nn.Module "
             "and calls `WeightWatcher(model=m).analyze()` (defaults); weightlab calls "
             "`weightlab.inspect.analyze(path)` on the checkpoint (defaults: streaming, one thread per core, float64 "
             "Gram eigenvalues). *wall* is the process wall time (Python start-up, imports, model loading, analysis); "
             "*imports* and *loading* (building the nn.Module) and *analysis* (the analyze call) are timed inside "
             "the child. The table gives medians of "
             f"{a.repeats} run(s), order alternating; the verdicts the ratio of each pair of runs (met only when every "
             "pair meets the target, with at least 3 pairs). Peak RSS is the child's own (max over runs). Ratios are "
             "weightlab / WeightWatcher. " + _tools_line(results), ""]
    header = ["model", "tool", "layers", "wall s", "imports s", "loading s", "analysis s", "peak MiB", "wall ratio",
              "analysis ratio", "RSS ratio"]
    rows = []
    verdicts = []
    agreement = {}
    for m in results:
        wl = results[m].get("wl")
        for t in results[m]:
            runs = results[m][t]
            if not runs:
                continue
            wall, an, rss = _med(runs, "wall_s"), _med(runs, "analyze_s"), max(r["rss_mib"] for r in runs)
            ratio = an_ratio = rss_ratio = ""
            if t != "wl" and wl:
                ratio = f"**{_med(wl, 'wall_s') / wall:.2f}x**"
                an_ratio = f"**{_med(wl, 'analyze_s') / an:.3f}x**"
                rss_ratio = f"{max(r['rss_mib'] for r in wl) / rss:.2f}x"
            rows.append([LABEL[m], TOOL_LABEL[t], len(runs[0]["rows"]), f"{wall:.1f}", f"{_med(runs, 'import_s'):.1f}",
                         f"{_med(runs, 'load_s'):.1f}" if t != "wl" else "0 (streamed)", f"{an:.2f}", f"{rss:.0f}",
                         ratio, an_ratio, rss_ratio])
        ww_runs = results[m].get("ww") or results[m].get("ww1")
        if wl and ww_runs:
            agreement[m] = compare(ww_runs[0]["rows"], wl[0]["rows"])
            for t in ("ww", "ww1"):
                if results[m].get(t):
                    # the i-th runs of the two tools ran back to back (order alternating): one ratio per pair
                    pairs = list(zip(wl, results[m][t]))
                    w = [a["wall_s"] / b["wall_s"] for a, b in pairs]
                    an = [a["analyze_s"] / b["analyze_s"] for a, b in pairs]
                    verdicts.append(f"- {LABEL[m]} vs {TOOL_LABEL[t]}, per pair: wall "
                                    f"{', '.join(f'{x:.2f}x' for x in w)}, analysis "
                                    f"{', '.join(f'{x:.3f}x' for x in an)} vs target <= {TARGET_TIME}x: wall "
                                    f"**{C.ratio_verdict(w, TARGET_TIME)}**, analysis "
                                    f"**{C.ratio_verdict(an, TARGET_TIME)}**")
    lines.append(C.md_table(header, rows))
    lines += ["", "Per-layer agreement (layers matched by name; |alpha difference| over matched layers):", ""]
    arows = []
    for m, c in agreement.items():
        rel = c["max_rel_diff"]
        arows.append([LABEL[m], f"{c['matched']} of {c['ww_layers']} (weightlab {c['wl_layers']})",
                      f"{c['median_abs_alpha_diff']:.1e}", f"{c['max_abs_alpha_diff']:.1e}",
                      f"{c['ww_median_alpha']:.4f} / {c['wl_median_alpha']:.4f}",
                      f"{c['num_pl_spikes_equal']} of {c['matched']}",
                      ", ".join(f"{k} {v:.0e}" for k, v in rel.items() if v is not None)])
        ok = c["median_abs_alpha_diff"] is not None and c["median_abs_alpha_diff"] < TARGET_ALPHA
        verdicts.append(f"- {LABEL[m]}: median |alpha difference| {c['median_abs_alpha_diff']:.1e} vs target < "
                        f"{TARGET_ALPHA}: **{'met' if ok else 'NOT met'}**")
    lines.append(C.md_table(["model", "layers matched", "median abs alpha diff", "max abs alpha diff",
                             "median alpha WW / weightlab", "same tail size",
                             "largest relative difference (stable_rank: non-conv layers)"],
                            arows))
    lines += ["", "Targets: wall time <= 0.2x WeightWatcher's, median alpha difference < 0.05.", *verdicts, "",
              "Notes:"]
    lines += [f"- {n}" for n in (getattr(a, "note", None) or [])]
    for m, c in agreement.items():
        if c["ww_only"] or c["wl_only"]:
            lines.append(f"- {LABEL[m]}: only in WeightWatcher's table: {', '.join(c['ww_only']) or 'none'}; only in "
                         f"weightlab's: {', '.join(c['wl_only']) or 'none'}.")
    lines += [
        "- Why the alphas agree to rounding: weightlab mirrors WeightWatcher 0.7.7's defaults: ESD = squared singular "
        "values of W (no normalisation) from the smaller Gram matrix in float64; eigenvalues <= 1e-5 dropped; every "
        "eigenvalue but the largest tried as xmin; alpha = 1 + n / sum ln(x/xmin); D = max |1 - (x/xmin)^(1-alpha) - "
        "(0..n-1)/n|; smallest D wins (first on ties); below 20 eigenvalues the bias-corrected small-N variant; conv "
        "kernels as k x k slices of c_out x c_in pooled, scaled by 1/2 (WeightWatcher's conv2d_norm; alpha does not "
        "depend on it, log norms do); same layer filters (min_evals 8, max_evals 15000, max_N 50000). What remains is "
        "float rounding: SVD (WeightWatcher) vs Gram eigenvalues (weightlab), and sums in a different order.",
        "- What is not the same: WeightWatcher walks nn.Modules, weightlab tensors. A tied `lm_head` is a second "
        "module to WeightWatcher (SmolLM2: 212 layers, the embedding twice) but is not stored in the checkpoint, so "
        "weightlab has 211; for an nn.Module or state dict, weightlab reports the tie (`tied_to`) without computing "
        "twice. 2-D parameters that are not Linear/Embedding/Conv modules would be analysed by weightlab and not by "
        "WeightWatcher. Where both report `stable_rank` of a conv layer, WeightWatcher's is of the pooled slice ESD, "
        "weightlab's of the c_out x (c_in k k) matrix.",
        "- Where the time goes: WeightWatcher does a full SVD per layer (on OpenBLAS's threads) plus a Python loop "
        "over every candidate xmin, after importing torch, pandas and transformers and building the model; "
        "weightlab streams tensors from the file, forms each Gram matrix in float64 (BLAS syrk, blockwise), takes "
        "its eigenvalues (LAPACK; the largest single cost), runs layers on one thread per core with BLAS limited to "
        "one thread (threadpoolctl), and prunes the xmin scan with exact lower bounds. Its start-up (`import torch` "
        "and weightlab, see *imports*) is a floor" + _floor_sentence(results) + ". On EfficientNet-Lite0 the layers are "
        "small (1x1 and depthwise convs), so WeightWatcher's SVDs are cheap too, and weightlab does work WeightWatcher "
        "does not: CNN Filter DB filter quality for the spatial convs (`filters=False` "
        "leaves it out) and the ranks of each c_out x (c_in k k) matrix besides the slice ESD. Float32 eigenvalues would not help: on this "
        "CPU numpy's float32 eigvalsh is no faster than float64, and the float32 Gram matrix would lose the small "
        "singular values that numerical rank needs.",
        "- Multi-threaded OpenBLAS on a busy 2-core machine: when another process holds a core, OpenBLAS's threads "
        "spin-wait for each other and WeightWatcher's SVDs can take many times longer; the OPENBLAS_NUM_THREADS=1 "
        "rows show WeightWatcher without that effect. weightlab always limits BLAS to one thread per worker.",
        f"- Whole benchmark run: {total_s / 60:.1f} min. Reproduce: `{REPRO}` (`--models`, `--repeats N`, "
        "`--tools ww ww1 wl`, `--no-write`).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
