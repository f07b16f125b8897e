"""weightlab's pruning methods on SmolLM2-135M, against llm-compressor's Wanda and SparseGPT in the same run.

    .venv/bin/python benchmarks/prune_smollm2.py              # every run (~20-25 min), updates RESULTS.md
    .venv/bin/python benchmarks/prune_smollm2.py --quick      # Wanda + SparseGPT, 50 % unstructured, both tools
    .venv/bin/python benchmarks/prune_smollm2.py --only lc:wanda@2:4,sparsegpt --no-write
    .venv/bin/python benchmarks/prune_smollm2.py --with-dpruner   # also D-Pruner (domain: Python's pydoc topics)
    .venv/bin/python benchmarks/prune_smollm2.py --profile wanda  # cProfile weightlab's prune() call, print the top

llm-compressor lives in its OWN virtual environment, so that the project's .venv (newer
transformers) is not changed. Create it once (it is not in .gitignore; do not commit it):

    python3 -m venv .venv-lc
    .venv-lc/bin/pip install torch==2.13.0            # the same CPU wheel as .venv
    .venv-lc/bin/pip install llmcompressor==0.14.0.1  # resolves transformers 5.17.0, compressed-tensors 0.19.0

(or point --lc-python / $WEIGHTLAB_LC_PYTHON at another interpreter that has llmcompressor).

Protocol (the one of shared/design/baselines.md, the same for both tools):
  model        SmolLM2-135M, fp32 HF folder from weightlab.zoo.smollm2()
  calibration  the first 32 x 512 tokens of the zoo's Wikipedia calibration split, as consecutive
               non-overlapping windows, no special tokens. Computed ONCE here and written to a file
               that every child reads (weightlab: prune(calib=ids); llm-compressor: a datasets.Dataset
               of those input_ids, shuffle off, batch size 1 as llm-compressor's default).
  pruning      50 % per layer (unstructured) and 2:4, every Linear of the 30 decoder blocks (210
               matrices); embeddings and the tied lm_head are never pruned.
  perplexity   weightlab.engine.evaluate.perplexity in BOTH environments: the first 16,384 tokens of
               the held-out split in 32 windows of 512 (16,352 scored tokens), batch 4, fp32.
Every (tool, method, pattern) runs in its own child process (wall time includes Python start-up,
imports, model load, pruning and the evaluation; peak RSS is the child's own). Inside each child the
prune phase and the evaluation phase are timed separately, and the kernel's peak-RSS counter is reset
between phases (/proc/self/clear_refs), so the prune phase's own peak is known. Runs that have both
tools alternate which tool goes first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _compress_common as CC  # noqa: E402
from _compress_common import EVAL_BATCH, LC_SETUP, NSAMPLES, SEQLEN, SMOKE  # noqa: E402

SECTION = "Prune: SmolLM2-135M, weightlab vs llm-compressor"
REPRO = ".venv/bin/python benchmarks/prune_smollm2.py"
SPARSITY = 0.5
MMAP_THRESHOLD = 131072  # --malloc-check: glibc's default initial threshold, kept fixed
WL_METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")
LC_METHODS = ("wanda", "sparsegpt")
PATTERNS = (None, "2:4")
PPL_SLACK = 1.01  # target: weightlab PPL <= llm-compressor PPL * 1.01
TOOL_SHORT = {"wl": "weightlab", "weightlab": "weightlab", "lc": "llm-compressor", "llm-compressor": "llm-compressor"}


def pat_name(p: str | None) -> str:
    return p or "unstructured"


# ============================================================================ children
# Everything below runs in a child process, in either virtual environment: stdlib at the top level only.

def _decoder_linears(model):
    import torch

    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.match(r"model\.layers\.\d+\.", n)}


def _embedding_zeros(model) -> tuple[int, int]:
    return (int((model.get_input_embeddings().weight == 0).sum()),
            int((model.get_output_embeddings().weight == 0).sum()))


def _check_pruned(model, pattern: str | None, out_dir: Path, tag: str) -> dict:
    """Sparsity over the decoder Linears (the same count for both tools), N:M validity, untouched
    embeddings, and the keep-mask of every decoder Linear packed to bits (for mask agreement)."""
    import hashlib

    import numpy as np

    lin = _decoder_linears(model)
    zeros = numel = bad_groups = 0
    per_layer_min = 1.0
    packed = []
    digest = hashlib.sha256()
    for n in sorted(lin):
        w = lin[n].weight.detach()
        digest.update(w.contiguous().numpy().tobytes())
        z = int((w == 0).sum())
        zeros += z
        numel += w.numel()
        per_layer_min = min(per_layer_min, z / w.numel())
        if pattern:
            nn_, mm = (int(x) for x in pattern.split(":"))
            g = (w == 0).reshape(w.shape[0], -1, mm).sum(-1)
            bad_groups += int((g < nn_).sum())
        packed.append(np.packbits((w != 0).numpy().reshape(-1)))
    np.save(out_dir / f"mask_{tag}.npy", np.concatenate(packed))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return {"layers": len(lin), "sparsity": zeros / numel, "min_layer_sparsity": per_layer_min,
            "nm_violating_groups": bad_groups if pattern else None,
            "embed_zeros": int((emb == 0).sum()), "lm_head_zeros": int((head == 0).sum()),
            "tied": bool(emb.data_ptr() == head.data_ptr()),
            "lm_head_dtype": str(head.dtype), "weights_sha": digest.hexdigest()[:16]}


def child_main(spec_path: str) -> int:
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    sys.path.insert(0, spec["src"])  # the llm-compressor venv does not have weightlab installed
    os.environ.setdefault("WEIGHTLAB_PROGRESS", "0")
    res: dict = {"tool": spec["tool"], "method": spec["method"], "pattern": spec["pattern"],
                 "calib_batch": spec.get("calib_batch"), "mmap_threshold": spec.get("mmap_threshold"),
                 "python": sys.executable}
    import torch

    res["versions"] = {k: C.package_version(k) for k in ("torch", "transformers", "llmcompressor",
                                                         "compressed-tensors", "datasets")}
    tool, method, pattern = spec["tool"], spec["method"], spec["pattern"]
    if tool == "weightlab":
        from weightlab.compress import prune
        from weightlab.io.hf import load_causal_lm
    elif tool == "llm-compressor":
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res["import_s"] = time.perf_counter() - t_start
    res["rss_after_imports_mib"] = CC.status_mib()["VmRSS"]
    res["loadavg_start"] = os.getloadavg()[0]
    t = time.perf_counter()
    if tool == "weightlab":
        model, tok = load_causal_lm(spec["model_dir"])
    else:
        tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                     local_files_only=True).eval()
    res["load_s"] = time.perf_counter() - t
    st = CC.status_mib()
    res["rss_after_load_mib"], res["load_peak_mib"] = st["VmRSS"], st["VmHWM"]
    res["rss_after_load_anon_file_mib"] = [st["RssAnon"], st["RssFile"]]
    res["model_mib"] = CC.model_bytes(model) / 2**20
    st = CC.materialize(model)
    res["rss_materialized_mib"] = st["VmRSS"]
    res["rss_materialized_anon_file_mib"] = [st["RssAnon"], st["RssFile"]]
    res["embed_zeros_before"] = _embedding_zeros(model)
    heldout = Path(spec["heldout_path"]).read_text(encoding="utf-8")

    if method != "dense":
        ids = CC.load_ids(spec["ids_path"], (NSAMPLES, SEQLEN))
        res["calib_ids_sha"] = CC.sha(ids)
        res["peak_reset"] = CC.reset_peak()
        rss0 = CC.status_mib()["VmRSS"]
        c0 = CC.cpu_s()
        t = time.perf_counter()
        if tool == "weightlab":
            params = {}
            if method == "dpruner":
                params["domain"] = spec["domain_path"]
            prof = None
            if spec.get("profile"):
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            calib = ids
            if spec.get("calib_batch"):  # the noise-floor variant: same ids, another accumulation order
                from weightlab.compress.prune import to_batches

                calib = to_batches(ids, batch_size=spec["calib_batch"])
            rep = prune(model, method, SPARSITY, pattern=pattern, calib=calib, tokenizer=tok, nsamples=NSAMPLES,
                        seqlen=SEQLEN, sampling="consecutive", show_progress=False, **params)
            if prof is not None:
                prof.disable()
                import io
                import pstats

                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
                (out_dir / f"profile_{spec['tag']}.txt").write_text(s.getvalue())
            res["report_sparsity"] = rep.sparsity
            res["report_seconds"] = rep.seconds
        else:
            mod_cls = WandaPruningModifier if method == "wanda" else SparseGPTModifier
            recipe = mod_cls(sparsity=SPARSITY, mask_structure=pattern or "0:0", targets=["Linear"],
                             ignore=["re:.*lm_head"])
            ds = Dataset.from_dict({"input_ids": ids.tolist()})
            oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=NSAMPLES,
                    max_seq_length=SEQLEN, shuffle_calibration_samples=False, batch_size=1)
        res["prune_s"] = time.perf_counter() - t
        res["prune_cpu_s"] = CC.cpu_s() - c0
        st = CC.status_mib()
        res["rss_before_prune_mib"] = rss0
        res["prune_peak_mib"] = st["VmHWM"]
        res["rss_after_prune_mib"] = st["VmRSS"]
        res["check"] = _check_pruned(model, pattern, out_dir, spec["tag"])
        res["check"]["embeddings_unchanged"] = _embedding_zeros(model) == tuple(res["embed_zeros_before"])
        model.eval()
    else:
        res["check"] = {"layers": len(_decoder_linears(model))}

    res["repeat"] = spec.get("repeat", 1)
    if spec.get("time_only"):  # a timing repeat: the perplexity of these weights is that of repeat 1
        res["eval"], res["eval_s"], res["eval_cpu_s"] = None, None, None
    else:
        CC.reset_peak()
        t = time.perf_counter()
        c0 = CC.cpu_s()
        res["eval"] = CC.eval_perplexity(model, tok, heldout)
        res["eval_s"] = time.perf_counter() - t
        res["eval_cpu_s"] = CC.cpu_s() - c0
        res["eval_peak_mib"] = CC.status_mib()["VmHWM"]
    res["child_s"] = time.perf_counter() - t_start
    res["child_cpu_s"] = CC.cpu_s()
    res["loadavg_end"] = os.getloadavg()[0]
    (out_dir / f"result_{spec['tag']}.json").write_text(json.dumps(res, indent=1))
    return 0


# ============================================================================ driver

def prepare_data(work: Path, with_dpruner: bool) -> dict:
    """Calibration ids (checked against weightlab's sampling='consecutive'), held-out text, domain text."""
    out = CC.prepare_smollm2(work)
    if with_dpruner:
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        (work / "pydoc_topics.txt").write_text(text, encoding="utf-8")
        out["domain_path"] = str(work / "pydoc_topics.txt")
        out["domain_chars"] = len(text)
    return out


def parse_only(items: str | None):
    """'[tool:]method[@pattern]' filters, comma-separated; tool wl|lc, pattern 50|unstructured|2:4; method 'mmap':
    the --malloc-check runs."""
    if not items:
        return None
    flt = []
    for it in items.split(","):
        it = it.strip()
        tool = None
        head, _, rest = it.partition(":")
        if head in TOOL_SHORT and rest:
            tool, it = TOOL_SHORT[head], rest
        method, _, pat = it.partition("@")
        pat = {"": "*", "50": None, "50%": None, "unstructured": None}.get(pat, pat)
        if method not in (*WL_METHODS, "dpruner", "dense", "mmap", "*", ""):
            sys.exit(f"--only: unknown method {method!r}")
        flt.append((tool, method or "*", pat))
    return flt


def plan_runs(args) -> list[dict]:
    """The run order: the pairs with llm-compressor first (each pair alternates which tool goes first),
    then their timing repeats (the prune call again, no evaluation; each round flips the order again),
    then weightlab's other methods, then the two dense evaluations (one per environment)."""
    methods = ("wanda", "sparsegpt") if args.quick else WL_METHODS + (("dpruner",) if args.with_dpruner else ())
    patterns = (None,) if args.quick else PATTERNS
    runs = []
    pairs = [(m, p) for p in patterns for m in LC_METHODS if m in methods]
    for k in range(1, max(1, args.repeats) + 1):
        for i, (m, pattern) in enumerate(pairs):
            extra = {} if k == 1 else {"repeat": k, "time_only": True}
            pair = [{"tool": "weightlab", "method": m, "pattern": pattern, **extra},
                    {"tool": "llm-compressor", "method": m, "pattern": pattern, **extra}]
            runs += pair[::-1] if (i + k - 1) % 2 else pair  # each pair flips its order every round
    for pattern in patterns:
        runs += [{"tool": "weightlab", "method": m, "pattern": pattern} for m in methods if m not in LC_METHODS]
    if args.noise:  # weightlab SparseGPT again with calibration batches of 1: the implementation's own spread
        runs += [{"tool": "weightlab", "method": "sparsegpt", "pattern": p, "calib_batch": 1} for p in patterns]
    if args.malloc_check:  # Wanda again with glibc's mmap threshold fixed: what allocator retention adds to RSS
        runs += [{"tool": "weightlab", "method": "wanda", "pattern": p, "mmap_threshold": MMAP_THRESHOLD}
                 for p in patterns]
    if not args.quick and not args.no_dense:
        runs += [{"tool": "weightlab", "method": "dense", "pattern": None},
                 {"tool": "llm-compressor", "method": "dense", "pattern": None}]
    flt = parse_only(args.only)
    if flt:
        runs = [r for r in runs if any((t is None or t == r["tool"])
                                       and (m == "*" or m == r["method"] or (m == "mmap" and r.get("mmap_threshold")))
                                       and (p == "*" or p == r["pattern"]) for t, m, p in flt)]
    if args.skip_lc:
        runs = [r for r in runs if r["tool"] != "llm-compressor"]
    for r in runs:
        r["tag"] = tag_of(r)
    return runs


def tag_of(r: dict) -> str:
    t = f"{'wl' if r['tool'] == 'weightlab' else 'lc'}_{r['method']}_{pat_name(r['pattern']).replace(':', '-')}"
    return (t + (f"_b{r['calib_batch']}" if r.get("calib_batch") else "")
            + (f"_mmap{r['mmap_threshold'] // 1024}k" if r.get("mmap_threshold") else "")
            + (f"_r{r['repeat']}" if r.get("repeat") else ""))


def key_of(r: dict) -> tuple:
    return r["tool"], r["method"], r["pattern"], variant(r)


def variant(r: dict):
    """What makes a run a variant of the main one (None for the main run)."""
    return r.get("calib_batch") or (f"mmap{r['mmap_threshold']}" if r.get("mmap_threshold") else None)


def tool_label(r: dict) -> str:
    return (r["tool"] + (f" (calib batch {r['calib_batch']})" if r.get("calib_batch") else "")
            + (f" (MALLOC_MMAP_THRESHOLD_={r['mmap_threshold']})" if r.get("mmap_threshold") else ""))


def run_child(run: dict, data: dict, work: Path, python: str, profile: set, threads: int | None = None) -> tuple[dict, C.Run]:
    spec = {**run, **data, "profile": run["tool"] == "weightlab" and run["method"] in profile}
    env = {"MALLOC_MMAP_THRESHOLD_": str(run["mmap_threshold"])} if run.get("mmap_threshold") else None
    return CC.run_child(__file__, spec, work, python, threads, env)


def mask_agreement(work: Path, a: str, b: str) -> float | None:
    import numpy as np

    pa, pb = work / f"mask_{a}.npy", work / f"mask_{b}.npy"
    if not (pa.exists() and pb.exists()):
        return None
    x, y = np.load(pa), np.load(pb)
    if x.shape != y.shape:
        return None
    diff = int(np.unpackbits(np.bitwise_xor(x, y)).sum())
    return diff / (x.size * 8)


def memory_bound(model_dir: str) -> dict:
    """weightlab's layer-by-layer engine: the resident model + cached activations + one block's working set."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, ffn, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads", heads)
    B, N, L, f4, f8 = EVAL_BATCH, NSAMPLES, SEQLEN, 4, 8  # prune() calibrates in batches of 4
    mib = 1 / 2**20
    acts = N * L * d * f4 + B * L * d * f4  # the cached inputs, replaced batch by batch by the block's outputs
    rope = 2 * (N // B) * B * L * hd * f4  # cos/sin kwargs kept per batch
    # one block forward on one batch: normed input, q, k, v, attention output, o, residuals;
    # gate, up, act(gate)*up, down; plus a (B, heads, L, L) score matrix if attention materializes it
    fwd = B * L * (5 * d + 2 * kv * hd + 3 * ffn) * f4 + B * heads * L * L * f4
    ins = [d] * 6 + [ffn]  # q k v o gate up down
    outs = [d, kv * hd, kv * hd, d, ffn, ffn, d]
    hook = 2 * B * L * max(ins) * f4  # rows*rows / scaled rows transients in LayerStats.add
    hess = sum(i * i for i in ins) * f4  # one H per Linear of the block, fp32
    solver = 4 * max(ins) ** 2 * f8 + 4 * max(i * o for i, o in zip(ins, outs)) * f8  # fp64 H, L, Hinv, U; W, W1...
    wanda = acts + rope + fwd + hook + sum(ins) * f4
    sgpt = acts + rope + fwd + hook + hess + solver
    return {"acts_mib": acts * mib, "rope_mib": rope * mib, "block_fwd_mib": fwd * mib, "hook_mib": hook * mib,
            "hessians_mib": hess * mib, "solver_mib": solver * mib,
            "bound_wanda_mib": wanda * mib, "bound_sparsegpt_mib": sgpt * mib,
            "prunable_fp32_mib": sum(i * o for i, o in zip(ins, outs)) * cfg["num_hidden_layers"] * f4 * mib}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only Wanda + SparseGPT at 50 %% unstructured, both tools")
    ap.add_argument("--only", help="comma-separated [tool:]method[@pattern] filters, e.g. 'lc:wanda@2:4,gblm'")
    ap.add_argument("--with-dpruner", action="store_true", help="add D-Pruner (domain text: Python's pydoc topics)")
    ap.add_argument("--no-dense", action="store_true", help="skip the two dense evaluations")
    ap.add_argument("--noise", action="store_true",
                    help="also run weightlab's SparseGPT with calibration batches of 1 (its numerical spread)")
    ap.add_argument("--malloc-check", action="store_true",
                    help="also run weightlab's Wanda with glibc's mmap threshold fixed at 128 KiB (allocator retention)")
    ap.add_argument("--skip-lc", action="store_true", help="weightlab only (no llm-compressor venv needed)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of each weightlab/llm-compressor pair (rounds 2.. time the prune call only; default 3)")
    ap.add_argument("--lc-python", help="python of the llm-compressor venv (default .venv-lc/bin/python)")
    ap.add_argument("--profile", default="", help="comma-separated weightlab methods to cProfile inside the child")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even for a --quick/--only run")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--keep", help="keep the work folder (ids, masks, per-run JSON) at this path")
    ap.add_argument("--note", action="append", help="a line on how the run was done, printed under the date (repeatable)")
    ap.add_argument("--render-only", metavar="DIR", nargs="+",
                    help="re-render the section from the results in kept work folder(s) (several: merged in order)")
    CC.add_threads_arg(ap)
    args = ap.parse_args(argv)
    if args.render_only:
        return render_only([Path(d) for d in args.render_only], args)
    runs = plan_runs(args)
    if not runs:
        sys.exit("nothing to run (check --only)")
    lc_py = CC.lc_python(args.lc_python) if any(r["tool"] == "llm-compressor" for r in runs) else None
    partial = is_partial(args)
    write = not args.no_write and (args.write or not partial) and not SMOKE
    t_all = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="wl-prune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    C.log(f"work folder {work}; {len(runs)} runs: " + ", ".join(r["tag"] for r in runs))
    data = prepare_data(work, args.with_dpruner or any(r["method"] == "dpruner" for r in runs))
    (work / "data.json").write_text(json.dumps(data))
    C.warm_page_cache([data["model_dir"]])
    C.log(f"calibration ids {NSAMPLES}x{SEQLEN} (sha {data['calib_ids_sha']}) = weightlab's consecutive windows")
    profile = {m for m in args.profile.split(",") if m}
    results = []
    for r in runs:
        py = C.python_exe() if r["tool"] == "weightlab" else lc_py
        C.log(f"{r['tag']} ...")
        res, cr = run_child(r, data, work, py, profile, args.threads)
        res["wall_s"], res["peak_rss_mib"], res["rss_source"] = cr.wall_s, cr.peak_rss_mib, cr.rss_source
        res["tag"], res["order"] = r["tag"], len(results)
        (work / f"result_{r['tag']}.json").write_text(json.dumps(res, indent=1))
        results.append(res)
        C.log(f"  wall {cr.wall_s:.1f}s, prune {res.get('prune_s', 0):.1f}s (cpu {res.get('prune_cpu_s', 0):.1f}s), "
              + (f"eval {res['eval_s']:.1f}s, PPL {res['eval']['perplexity']:.3f}, " if res["eval"] else "timing repeat, ")
              + f"peak {cr.peak_rss_mib:.0f} MiB, "
              f"prune-phase peak {res.get('prune_peak_mib', 0):.0f} MiB, sparsity {res['check'].get('sparsity', 0):.4f}, "
              f"load avg {res['loadavg_start']:.1f}->{res['loadavg_end']:.1f}")
        prof = work / f"profile_{r['tag']}.txt"
        if prof.exists():
            print(prof.read_text()[:8000])
    total = time.perf_counter() - t_all
    (work / "total_s.txt").write_text(f"{total}\n{' '.join(_argv_summary(args))}\n")
    body = CC.add_notes(render(results, data, work, total, " ".join(_argv_summary(args)) if partial else ""), args.note)
    return CC.publish(body, work, SECTION, write, args.keep)


def is_partial(args) -> bool:
    return bool(args.quick or args.only or args.skip_lc or args.no_dense)


def render_only(works: list[Path], args) -> int:
    """Render from kept work folders (e.g. a run that was stopped, plus a second run for the rest)."""
    data = json.loads((works[0] / "data.json").read_text())
    results, totals, notes = [], [], []
    for w in works:
        d = json.loads((w / "data.json").read_text())
        if d["calib_ids_sha"] != data["calib_ids_sha"]:
            sys.exit(f"{w} used other calibration ids")
        rs = sorted((json.loads(p.read_text()) for p in w.glob("result_*.json")), key=lambda r: r.get("order", 0))
        rs = [r for r in rs if "wall_s" in r]  # only runs that finished under the driver
        results += [r for r in rs if r["tag"] not in {x["tag"] for x in results}]
        lines = (w / "total_s.txt").read_text().splitlines() if (w / "total_s.txt").exists() else []
        totals.append(float(lines[0]) if lines else sum(r["wall_s"] for r in rs))
        notes.append((lines[1].strip() if len(lines) > 1 else "") if lines else "stopped early, finished runs only")
    if len(works) > 1:  # masks are looked up in the first folder
        import shutil

        for w in works[1:]:
            for m in w.glob("mask_*.npy"):
                if not (works[0] / m.name).exists():
                    shutil.copy(m, works[0] / m.name)
    note = "; ".join(n for n in notes if n)
    if len(works) > 1:
        note = f"{len(works)} invocations merged" + (f": {note}" if note else "")
    body = CC.add_notes(render(results, data, works[0], sum(totals), note), args.note)
    print(body)
    if not args.no_write and not SMOKE:
        C.write_section(SECTION, body)
        C.log(f"wrote the '{SECTION}' section of {C.RESULTS_MD}")
    return 0


# ============================================================================ report

def _f(x, nd=1):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def render(results: list[dict], data: dict, work: Path, total_s: float, note: str) -> str:
    loads = [x for r in results for x in (r.get("loadavg_start"), r.get("loadavg_end")) if x is not None]
    rounds = pair_rounds(results)
    results = [r for r in results if r.get("repeat", 1) == 1]
    by = {key_of(r): r for r in results}
    wl_v = next((r["versions"] for r in results if r["tool"] == "weightlab"), {})
    lc_v = next((r["versions"] for r in results if r["tool"] == "llm-compressor"), {})
    bound = memory_bound(data["model_dir"])
    model_mib = next((r["model_mib"] for r in results if "model_mib" in r), float("nan"))
    lines = [f"Date: {C.today()}. Machine: {C.machine_line()}. " + C.load_sentence(loads),
             f"Versions: weightlab {C.package_version('weightlab')} in .venv (torch {wl_v.get('torch', 'n/a')}, "
             f"transformers {wl_v.get('transformers', 'n/a')}); llm-compressor {lc_v.get('llmcompressor', 'n/a')} in its own "
             f".venv-lc (torch {lc_v.get('torch', 'n/a')}, transformers {lc_v.get('transformers', 'n/a')}, compressed-tensors "
             f"{lc_v.get('compressed-tensors', 'n/a')}, datasets {lc_v.get('datasets', 'n/a')}). torch threads per child: "
             f"{sorted({r['eval'].get('threads') for r in results})} (the same for both tools).", ""]
    lines += [
        "Protocol (that of shared/design/baselines.md, identical for both tools): SmolLM2-135M fp32 "
        "(`weightlab.zoo.smollm2()`); calibration = the first 32x512 tokens of the zoo's Wikipedia calibration "
        "split as consecutive windows, no special tokens, computed once and read from one file by every child "
        f"(sha {data['calib_ids_sha']}, checked equal to weightlab's `sampling=\"consecutive\"`); 50 % per layer or 2:4 "
        "on the 210 Linear matrices of the 30 decoder blocks (embeddings and the tied lm_head unchanged, checked); "
        "perplexity = `weightlab.engine.evaluate.perplexity` in both environments: the first 16,384 held-out "
        "tokens in 32 windows of 512 (16,352 scored), batch 4, fp32. weightlab: `prune(model, METHOD, 0.5, "
        "pattern=None|'2:4', calib=ids)` (its defaults otherwise: calibration batches of 4; SparseGPT block 128, "
        "damping 0.01). llm-compressor: `oneshot(model, dataset=Dataset({'input_ids': ids}), "
        "recipe=WandaPruningModifier|SparseGPTModifier(sparsity=0.5, mask_structure='0:0'|'2:4', targets=['Linear'], "
        "ignore=['re:.*lm_head']), num_calibration_samples=32, max_seq_length=512, shuffle_calibration_samples=False, "
        "batch_size=1)` (its defaults otherwise: sequential pipeline, block 128, damping 0.01).",
        f"Each run is its own child process. The weightlab/llm-compressor pairs run {max(map(len, rounds.values()), default=1)} "
        "round(s), each round flipping which tool goes first; round 1 also evaluates and masks (the big table), later "
        "rounds time the prune call only and must give the same weights (checked by a hash of every pruned matrix). "
        "Other runs: once. **wall** = the whole "
        "child (start-up, imports, load, prune, evaluation); **prune** = the `prune(...)` / `oneshot(...)` call, wall "
        "and CPU seconds; **peak RSS** = the child's own (" + (results[0]["rss_source"] if results else "?") + "; the "
        "evaluation with its 4x512x49,152 fp32 logits sets it); **prune peak** = the highest RSS during the prune call "
        "alone (the kernel's peak counter is reset just before it), and in brackets that minus the RSS just before "
        "the call: the pruning engine's own memory (both tools' models are first copied out of transformers' "
        "memory-mapped safetensors into ordinary memory, so that pruning in place does not count the file pages "
        "and their copy-on-write copies twice). Ratios are weightlab / llm-compressor for the "
        "same method and pattern; **mask differs** = share of the 106M decoder weights whose kept/pruned state differs "
        "between the two tools.", ""]
    header = ["method", "pattern", "tool", "PPL", "wall s", "prune s", "prune CPU s", "prune/eval", "peak RSS MiB",
              "prune peak MiB (engine)", "PPL ratio", "prune-time ratio", "prune-CPU ratio", "peak RSS ratio",
              "mask differs"]
    rows, verdicts, notes = [], [], []
    for r in results:
        key_other = ("llm-compressor" if r["tool"] == "weightlab" else "weightlab", r["method"], r["pattern"], None)
        o = by.get(key_other) if r["method"] in LC_METHODS and not variant(r) else None
        ppl = r["eval"]["perplexity"]
        pr = pt = pc = rr = md = None
        if o is not None and r["tool"] == "weightlab":
            pr = ppl / o["eval"]["perplexity"]
            pt = r["prune_s"] / o["prune_s"]
            pc = r["prune_cpu_s"] / o["prune_cpu_s"]
            rr = r["peak_rss_mib"] / o["peak_rss_mib"]
            md = mask_agreement(work, r["tag"], o["tag"])
            verdicts.append((r["method"], r["pattern"], pr, ppl, o["eval"]["perplexity"]))
        eng = engine_mib(r)
        rows.append([r["method"], pat_name(r["pattern"]) if r["method"] != "dense" else "-", tool_label(r),
                     f"**{ppl:.3f}**", _f(r["wall_s"]), _f(r.get("prune_s")), _f(r.get("prune_cpu_s")),
                     _f(r["prune_s"] / r["eval_s"], 2) if r.get("prune_s") else "-",
                     _f(r["peak_rss_mib"], 0),
                     f"{_f(r.get('prune_peak_mib'), 0)} ({_f(eng, 0)})" if eng is not None else "-",
                     C.fmt_ratio(pr), C.fmt_ratio(pt), C.fmt_ratio(pc), C.fmt_ratio(rr),
                     "n/a" if md is None else f"{100 * md:.2f}%"])
        ck = r["check"]
        label = "dense" if r["method"] == "dense" else f"{r['method']} {pat_name(r['pattern'])}"
        bits = [f"{tool_label(r)} {label}: load avg {r['loadavg_start']:.1f}->{r['loadavg_end']:.1f}",
                f"eval {r['eval_s']:.1f} s wall / {r['eval_cpu_s']:.1f} s CPU", f"child CPU {r['child_cpu_s']:.0f} s",
                f"{r['eval']['tokens']} tokens (ids sha {r['eval']['eval_ids_sha']})"]
        if r["method"] != "dense":
            bits.append(f"sparsity {ck['sparsity']:.4f} over {ck['layers']} matrices (lowest layer {ck['min_layer_sparsity']:.4f})"
                        + (f", {ck['nm_violating_groups']} groups violating {r['pattern']}" if r["pattern"] else "")
                        + f", embeddings/lm_head {'unchanged' if ck.get('embeddings_unchanged') else 'CHANGED'}")
        notes.append("- " + "; ".join(bits))
    lines += [C.md_table(header, rows), ""]
    lines += timing_table(rounds)
    lines.append("Targets (weightlab vs llm-compressor, same run): PPL <= llm-compressor x 1.01, and no slower (the "
                 "prune call, wall time, in every round: met only when at least 3 alternating rounds all meet it, "
                 "'not shown' when the rounds straddle the target; CPU time shown as the less noisy check).")
    for m, p, pr, a, b in verdicts:
        wall, cpu = round_ratios(rounds.get((m, p), []))
        lines.append(f"- {m} {pat_name(p)}: PPL {a:.3f} vs {b:.3f} = {pr:.4f}x: "
                     f"**{'met' if pr <= PPL_SLACK else 'NOT met'}**; prune wall per round "
                     f"{', '.join(f'{x:.2f}x' for x in wall)}: **{C.ratio_verdict(wall, 1.0)}** (CPU per round "
                     f"{', '.join(f'{x:.2f}x' for x in cpu)}: {C.ratio_verdict(cpu, 1.0)})")
    lines.append("")
    lines.append("Memory bound of weightlab's layer-by-layer engine (Wanda, SparseGPT): the model stays resident "
                 f"(`load_causal_lm` loads it whole, {model_mib:.0f} MiB fp32), and on top of it the engine holds only the cached "
                 f"block inputs of all calibration samples, which the block's outputs replace batch by batch "
                 f"(({NSAMPLES} + {EVAL_BATCH}) x {SEQLEN} x 576 x 4 B = {bound['acts_mib']:.0f} MiB), the rotary cos/sin kwargs ({bound['rope_mib']:.0f} MiB), one block's "
                 f"forward on one batch of 4 ({bound['block_fwd_mib']:.0f} MiB, counting a materialized 4x9x512x512 "
                 f"score matrix), hook transients ({bound['hook_mib']:.0f} MiB) and one block's statistics (SparseGPT: "
                 f"7 fp32 Hessians {bound['hessians_mib']:.0f} MiB + fp64 solver buffers {bound['solver_mib']:.0f} MiB). "
                 f"Bound over imports + model: Wanda {bound['bound_wanda_mib']:.0f} MiB, SparseGPT "
                 f"{bound['bound_sparsegpt_mib']:.0f} MiB. GBLM and D-Pruner are not layer-bounded: GBLM's gradient pass "
                 "back-propagates through the whole model and keeps 3 fp32 moment accumulators per prunable weight "
                 f"({3 * bound['prunable_fp32_mib']:.0f} MiB); D-Pruner trains the whole model on the domain data (a "
                 "copy of every parameter, its gradients and one fp32 score per prunable weight).")
    lines += memory_checks(results, rounds, bound)
    lines += ["", "Why the two tools differ (same data, same algorithm, same evaluation code):"] + explain(results, by, work, rounds)
    lines += ["", "Per-run details:"] + notes + [""]
    lines.append(f"Whole benchmark run: {total_s / 60:.1f} min" + (f" (partial run: {note})" if note else "") + ". "
                 f"Reproduce: `{REPRO}` (`--quick`, `--only [wl|lc:]METHOD[@2:4]`, `--repeats N`, `--with-dpruner`, `--profile wanda`, "
                 "`--no-write`, `--keep DIR` then `--render-only DIR`); llm-compressor's venv: `" + LC_SETUP + "`.")
    return "\n".join(lines)


def memory_checks(results: list[dict], rounds: dict, bound: dict) -> list[str]:
    """weightlab's engine memory (prune-phase peak RSS minus the RSS before it) in every round vs the bound,
    and what the allocator variant (--malloc-check) measures."""
    out = []
    for (m, p), pairs in rounds.items():
        engs = [e for e in (engine_mib(a) for a, _ in pairs) if e is not None]
        b = bound[f"bound_{m}_mib"]
        over = sum(e > b for e in engs)
        if engs:
            out.append(f"- check {m} {pat_name(p)}: engine memory per round {' / '.join(f'{e:.0f}' for e in engs)} MiB "
                       f"vs bound {b:.0f} MiB: **{'within' if not over else f'EXCEEDED in {over} of {len(engs)}'}**")
    for r in results:
        eng = engine_mib(r)
        if not r.get("mmap_threshold") or eng is None:
            continue
        b = bound[f"bound_{r['method']}_mib"]
        main = [a for a, _ in rounds.get((r["method"], r["pattern"]), [])]
        out.append(f"- check {r['method']} {pat_name(r['pattern'])} with MALLOC_MMAP_THRESHOLD_={r['mmap_threshold']}: "
                   f"engine memory {eng:.0f} MiB vs bound {b:.0f} MiB: **{'within' if eng <= b else 'EXCEEDED'}**; "
                   f"prune {r['prune_s']:.1f} s"
                   + (f" vs {min(a['prune_s'] for a in main):.1f}-{max(a['prune_s'] for a in main):.1f} s with glibc's "
                      "defaults" if main else ""))
    if any(r.get("mmap_threshold") for r in results):
        out.append("- The bound counts live tensors; RSS also counts memory the allocator keeps after it is freed. "
                   "glibc raises its mmap threshold after the first large free (up to 32 MiB), so later activation-sized "
                   "buffers come from its heap and are kept for reuse instead of being returned; how much is kept varies "
                   "from run to run. With the threshold fixed (every freed block over 128 KiB returned at once) the "
                   "same prune call measures the figures above, at the time cost shown.")
    return out


def pair_rounds(results: list[dict]) -> dict:
    """(method, pattern) -> [(weightlab run, llm-compressor run) for each round that has both]."""
    runs = {}
    for r in results:
        if r["method"] in LC_METHODS and not variant(r):
            runs.setdefault((r["method"], r["pattern"], r.get("repeat", 1)), {})[r["tool"]] = r
    out = {}
    for (m, p, k), d in sorted(runs.items(), key=lambda kv: kv[0][2]):
        if len(d) == 2:
            out.setdefault((m, p), []).append((d["weightlab"], d["llm-compressor"]))
    return out


def round_ratios(pairs: list) -> tuple[list[float], list[float]]:
    return ([a["prune_s"] / b["prune_s"] for a, b in pairs], [a["prune_cpu_s"] / b["prune_cpu_s"] for a, b in pairs])


def timing_table(rounds: dict) -> list[str]:
    """The prune call of every round of every pair; the weights of later rounds checked equal to round 1's."""
    if not rounds:
        return []
    rows = []
    for (m, p), pairs in rounds.items():
        wall, cpu = round_ratios(pairs)
        same = {t: all(x["check"].get("weights_sha") == pairs[0][i]["check"].get("weights_sha") for x in col)
                for i, (t, col) in enumerate((("weightlab", [a for a, _ in pairs]), ("llm-compressor", [b for _, b in pairs])))}
        first = ", ".join("wl" if a["order"] < b["order"] else "lc" for a, b in pairs)
        rows.append([m, pat_name(p), len(pairs), first,
                     " / ".join(f"{a['prune_s']:.1f}" for a, _ in pairs), " / ".join(f"{b['prune_s']:.1f}" for _, b in pairs),
                     ", ".join(f"{x:.2f}x" for x in wall), ", ".join(f"{x:.2f}x" for x in cpu),
                     " / ".join("yes" if same[t] else "NO" for t in ("weightlab", "llm-compressor"))])
    return ["Timing rounds (the prune call, wall seconds; ratios weightlab / llm-compressor per round):", "",
            C.md_table(["method", "pattern", "rounds", "first in each round", "weightlab prune s", "llm-compressor prune s",
                        "wall ratio per round", "CPU ratio per round", "same weights every round (wl / lc)"], rows), ""]


def explain(results: list[dict], by: dict, work: Path, rounds: dict) -> list[str]:
    out = []
    tv = {t: next((r["versions"].get("transformers") for r in results if r["tool"] == t), "n/a")
          for t in ("weightlab", "llm-compressor")}
    releases = f"{tv['weightlab']} vs {tv['llm-compressor']}"
    dense = {r["tool"]: r["eval"]["perplexity"] for r in results if r["method"] == "dense"}
    if dense:
        out.append("- Dense model: PPL " + ", ".join(f"{v:.3f} in {k}'s environment" for k, v in dense.items())
                   + " (baselines.md: 16.875). "
                   + (f"The two environments (transformers {releases}) evaluate the dense model "
                      + ("identically." if len(set(round(v, 3) for v in dense.values())) == 1 else
                         f"{abs(max(dense.values()) / min(dense.values()) - 1) * 100:.3f} % apart.")
                      if len(dense) == 2 else ""))
    pairs = [(r, by.get(("llm-compressor", r["method"], r["pattern"], None))) for r in results
             if r["tool"] == "weightlab" and r["method"] in LC_METHODS and not variant(r)]
    pairs = [(a, b) for a, b in pairs if b is not None]
    for v in results:
        if not v.get("calib_batch"):
            continue
        a, b = by.get(("weightlab", v["method"], v["pattern"], None)), by.get(("llm-compressor", v["method"], v["pattern"], None))
        if a is None:
            continue
        pv, pa = v["eval"]["perplexity"], a["eval"]["perplexity"]
        md = mask_agreement(work, v["tag"], a["tag"])
        out.append(f"- Numerical spread of one implementation: weightlab {v['method']} {pat_name(v['pattern'])} with "
                   f"calibration batches of {v['calib_batch']} instead of 4 (the same 32 sequences; only the float32 "
                   f"summation order of the statistics changes) gives PPL {pv:.3f} vs {pa:.3f} "
                   f"({100 * (pv / pa - 1):+.2f} %)" + (f", {100 * md:.2f} % of the keep/prune decisions differ" if md is not None else "")
                   + (f"; llm-compressor: {b['eval']['perplexity']:.3f}" if b else "") + ".")
    for a, b in pairs:
        md = mask_agreement(work, a["tag"], b["tag"])
        out.append(f"- {a['method']} {pat_name(a['pattern'])}: PPL {a['eval']['perplexity']:.3f} (weightlab) vs "
                   f"{b['eval']['perplexity']:.3f} (llm-compressor); "
                   + (f"{100 * md:.2f} % of the decoder weights have a different keep/prune decision." if md is not None else ""))
    if pairs:
        out.append("- Both implement the same rules: Wanda scores |W_ij|·||x_j|| and prunes the lowest half of every "
                   "output row (2:4: the 2 lowest of every 4 inputs of a row), no weight update; SparseGPT is the OBS "
                   "solve with the upper Cholesky factor of the damped inverse Hessian (damping 0.01 x mean diag, "
                   "128-column lazy blocks), masks chosen per 128-column block (2:4: per group of 4) on the updated "
                   "weights. Both run block by block and feed each block the outputs of the already-pruned earlier "
                   "blocks. The residual differences are numerical and tie-breaking details: (1) the statistics are "
                   "accumulated in float32 in a different order (weightlab in batches of 4 sequences, llm-compressor "
                   "one sequence at a time), so near-equal scores can swap; (2) the block forwards run on different "
                   f"transformers releases ({releases}); (3) SparseGPT: weightlab solves in float64, llm-compressor in "
                   "float32, and llm-compressor's unstructured threshold test `score <= sorted[k]` prunes k+1 (or more, "
                   "on ties) weights per 128-column block where weightlab prunes exactly k (achieved sparsity 0.5000 "
                   "vs slightly above); (4) ties: weightlab breaks them by the lowest index (stable sort), "
                   "llm-compressor's 2:4 uses topk. Each flipped decision changes the next block's inputs, so "
                   "small differences compound over the 30 blocks; the PPL gaps above are of that size.")
        every = [ab for prs in rounds.values() for ab in prs]
        faster = [(a, b) for a, b in every if a["prune_cpu_s"] < b["prune_cpu_s"]]
        out.append(f"- Speed: weightlab's prune call used less CPU than llm-compressor's in {len(faster)} of {len(every)} "
                   "rounds. Both do two passes over every block (statistics, then propagation through the pruned "
                   "block) on the same 16,384 tokens. How the work is organised differs: llm-compressor traces the "
                   "model into subgraphs with torch.fx, runs its session/lifecycle machinery and an intermediates cache, "
                   "and calibrates one sequence at a time (its default batch_size=1) where weightlab runs plain hooks "
                   "on batches of 4; SparseGPT's solve is float64 in weightlab and float32 in llm-compressor. "
                   "llm-compressor itself was not profiled, so which of these accounts for the gap is not measured here. "
                   "'prune/eval' divides each prune call by the same child's evaluation (identical work in both "
                   "tools, run right after it), a rough correction for the load on the machine; CPU seconds are the "
                   "check least sensitive to other jobs.")
    return out


def engine_mib(r: dict) -> float | None:
    """The pruning engine's own memory: prune-phase peak RSS minus the RSS just before it (the model
    materialized in anonymous memory, see CC.materialize); older runs: minus (imports + model bytes)."""
    if "prune_peak_mib" not in r:
        return None
    if "rss_materialized_mib" in r:
        return r["prune_peak_mib"] - r["rss_before_prune_mib"]
    if "rss_after_imports_mib" not in r:
        return None
    return r["prune_peak_mib"] - r["rss_after_imports_mib"] - r["model_mib"]


def _argv_summary(args) -> list[str]:
    out = []
    for k in ("quick", "only", "with_dpruner", "no_dense", "skip_lc", "noise", "malloc_check"):
        v = getattr(args, k)
        if v:
            out.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return out


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
