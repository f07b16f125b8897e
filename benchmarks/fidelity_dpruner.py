"""Fidelity: does D-Pruner keep both domain and general ability better than SparseGPT / Wanda?

    nice .venv/bin/python benchmarks/fidelity_dpruner.py --seeds 0 1 2 --runs /tmp/dpruner-runs   # runs, cached
    .venv/bin/python benchmarks/fidelity_dpruner.py --runs /tmp/dpruner-runs --section /tmp/dp.md  # table only
    flock /tmp/wl-shared.lock python3 /tmp/h/put_section.py benchmarks/RESULTS.md "## Fidelity: D-Pruner" /tmp/dp.md "..."

Claim (Zhang et al., NAACL 2024 Findings): pruning LLaMA-2 to 50% with D-Pruner (general importance from
open-domain data regularizing a domain fine-tuning pass whose summed Taylor scores pick the mask) keeps
domain-specific *and* general ability better than SparseGPT and Wanda.

Setting: SmolLM2-135M (weightlab.zoo.smollm2(), fp32) at 50% unstructured, every Linear inside the blocks.
Open domain = the zoo's Wikipedia calibration split; domain = gensim's lee_background.cor (300 Australian news
articles): the first 240 articles calibrate, the last 60 are held out. Calibration: --nsamples windows of
--seqlen tokens sampled with the seed (both sets). Wanda and SparseGPT calibrate on the open-domain set (what
the paper's baselines use); D-Pruner uses both; "D-Pruner lambda=0" is the domain pass alone (no general
term). Evaluation: perplexity on the first --eval-tokens of the Wikipedia held-out split and of the held-out
news articles (windows of 256). Each (method, seed) runs once and is cached as JSON under --runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

TITLE = "## Fidelity: D-Pruner"
METHODS = ("magnitude", "wanda", "sparsegpt", "dpruner", "dpruner-l0", "dpruner-d4")


def lee_split(work: Path) -> tuple[Path, str]:
    """(calibration file of the first 240 news articles, held-out text of the last 60)."""
    import gensim

    src = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    arts = [a.strip() for a in src.read_text(encoding="utf-8").splitlines() if a.strip()]
    calib = work / "lee_calib.txt"
    text = "\n\n".join(arts[:240])
    if not calib.exists() or calib.read_text(encoding="utf-8") != text:  # atomic: seeds may run in parallel
        tmp = work / f".lee_calib.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, calib)
    return calib, "\n\n".join(arts[240:])


def run_one(method: str, seed: int, args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightlab.compress.prune import prune
    from weightlab.engine.evaluate import perplexity
    from weightlab.zoo import smollm2, wiki_text

    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    folder = smollm2()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    dom_calib, dom_heldout = lee_split(work)
    t0 = time.perf_counter()
    rep = None
    if method != "dense":
        name, params = method, {}
        if method.startswith("dpruner"):
            name = "dpruner"
            params = {"domain": str(dom_calib), "domain_nsamples": args.domain_nsamples}
            if method == "dpruner-d4":  # 4x the domain windows: 4x the SGD steps the score sums over
                params["domain_nsamples"] = 4 * args.domain_nsamples
            if method == "dpruner-l0":
                params["lambda"] = 0.0
        rep = prune(model, name, 0.5, calib="wiki", tokenizer=tok, nsamples=args.nsamples, seqlen=args.seqlen,
                    seed=seed, show_progress=args.progress, **params)
    secs = time.perf_counter() - t0
    ev = {}
    for key, text in (("general", wiki_text("heldout")), ("domain", dom_heldout)):
        ev[key] = perplexity(model, tok, text, seqlen=256, max_tokens=args.eval_tokens, batch_size=4,
                             show_progress=False)["perplexity"]
    return {"method": method, "seed": seed, "seconds": round(secs, 1), "sparsity": rep.sparsity if rep else 0.0,
            "ppl_general": ev["general"], "ppl_domain": ev["domain"], "threads": args.threads,
            "load": os.getloadavg()[0], "nsamples": args.nsamples, "seqlen": args.seqlen,
            "domain_nsamples": args.domain_nsamples}


def section(runs: list[dict], args) -> str:
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    dense = by.get("dense", [None])[0]
    names = {"dense": "dense", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
             "dpruner": "D-Pruner (lambda 0.1)", "dpruner-l0": "D-Pruner lambda=0 (domain only)",
             "dpruner-d4": "D-Pruner, 4x domain windows"}

    def fmt(vals):
        return f"{statistics.mean(vals):.2f}" + (f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")

    rows = []
    for m in ("dense", *METHODS):
        rs = by.get(m, [])
        if not rs:
            continue
        rows.append(f"| {names[m]} | {len(rs)} | {fmt([r['ppl_domain'] for r in rs])} | "
                    f"{fmt([r['ppl_general'] for r in rs])} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    seeds = sorted({r["seed"] for r in runs if r["method"] == "dpruner"})

    def mean(m, k):
        return statistics.mean(r[k] for r in by[m]) if by.get(m) else float("nan")

    wins = [m for m in ("wanda", "sparsegpt") if by.get(m) and by.get("dpruner")
            and mean("dpruner", "ppl_domain") < mean(m, "ppl_domain")
            and mean("dpruner", "ppl_general") < mean(m, "ppl_general")]
    loads = [r["load"] for r in runs]
    head = [TITLE, "",
            "Claim (Zhang et al., \"Pruning as a Domain-specific LLM Extractor\", NAACL 2024 Findings): at 50% "
            "unstructured sparsity D-Pruner keeps domain-specific and general ability better than SparseGPT and "
            "Wanda (LLaMA-2 7B/13B, medical and legal domains).",
            "",
            f"Setting: SmolLM2-135M-Instruct (fp32), 50% of every Linear in the blocks; open domain = zoo Wikipedia "
            f"calibration split, domain = gensim lee_background news (240 articles calibrate, 60 held out); "
            f"calibration {args.nsamples}x{args.seqlen} tokens per seed (domain {args.domain_nsamples}x{args.seqlen}); "
            "Wanda/SparseGPT calibrate on Wikipedia. D-Pruner runs the reference's recipe as weightlab implements it "
            "(general SparseGPT-saliency pass, 5 epochs of SGD lr 0.03 batch 8 with the regularized gradient, summed "
            "scores, 32 column blocks per matrix), only the data sizes are smaller than the paper's. Perplexity: "
            f"first {args.eval_tokens} tokens of the Wikipedia held-out split and of the held-out news, windows of "
            f"256. Seeds: {', '.join(map(str, seeds)) or '-'} (calibration sampling and the domain-pass order). "
            f"CPU, {runs[0]['threads'] if runs else '?'} thread(s) per process, machine shared (1-min load "
            f"{min(loads):.1f}-{max(loads):.1f} during the runs).",
            "",
            "| method | runs | domain PPL (news) | general PPL (Wikipedia) | seconds (wall, varying load) |",
            "|---|---|---|---|---|", *rows, ""]
    if dense:
        head.append(f"Dense: domain {dense['ppl_domain']:.2f}, general {dense['ppl_general']:.2f}.")
    head.append("")
    seed_of = {m: {r["seed"]: r for r in by.get(m, [])} for m in by}
    for other in ("wanda", "sparsegpt", "dpruner-l0", "dpruner-d4"):
        pairs = [(seed_of["dpruner"][s], seed_of[other][s]) for s in seeds if s in seed_of.get(other, {})]
        if pairs:
            dd = ", ".join(f"{a['ppl_domain'] - b['ppl_domain']:+.2f}" for a, b in pairs)
            dg = ", ".join(f"{a['ppl_general'] - b['ppl_general']:+.2f}" for a, b in pairs)
            head.append(f"- D-Pruner minus {names[other]}, per seed: domain PPL {dd}; general PPL {dg}.")
    head.append("")
    verdict = ("reproduced" if len(wins) == 2 else "partly reproduced" if wins else "not reproduced")
    beaten = " and ".join(names[w] for w in wins)
    head.append(f"Verdict (D-Pruner at --domain-nsamples): **{verdict}** on this small setting: " + (
        f"D-Pruner has lower domain *and* general perplexity than {beaten} (means over seeds). " if wins else
        "D-Pruner has neither lower domain nor lower general perplexity than Wanda or SparseGPT (means over "
        "seeds). ") + args.note)
    head.append("")
    sizes = (f"--nsamples {args.nsamples} --domain-nsamples {args.domain_nsamples} --seqlen {args.seqlen} "
             f"--eval-tokens {args.eval_tokens}")
    head.append(f"Rerun: `nice .venv/bin/python benchmarks/fidelity_dpruner.py --seeds 0 1 2 {sizes} --runs DIR` "
                f"(one process per seed may run in parallel), then `--runs DIR --section FILE {sizes}` and "
                "put_section.")
    return "\n".join(head) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--methods", nargs="*", default=["dense", *METHODS])
    ap.add_argument("--runs", default="/tmp/dpruner-runs")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--domain-nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default=None, help="write the RESULTS.md section to this file")
    ap.add_argument("--note", default="", help="text appended to the verdict line")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = ap.parse_args()
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for m in args.methods:
            s = 0 if m in ("dense", "magnitude") else seed  # data-free: one run
            f = runs_dir / f"{m}-{s}.json"
            if f.exists():
                continue
            r = run_one(m, s, args, runs_dir)
            f.write_text(json.dumps(r))
            print(f"[{time.strftime('%H:%M:%S')}] {m} seed {s}: domain {r['ppl_domain']:.2f} general "
                  f"{r['ppl_general']:.2f} ({r['seconds']} s)", flush=True)
    if args.section:
        runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
        Path(args.section).write_text(section(runs, args))


if __name__ == "__main__":
    main()
