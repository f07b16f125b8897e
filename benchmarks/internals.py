"""LLM internals on SmolLM2-135M: feature neurons through the LM head, attention sinks and dormant heads.

    .venv/bin/python benchmarks/internals.py            # ~15 min on 2 busy CPU cores; updates RESULTS.md
    .venv/bin/python benchmarks/internals.py --quick    # a few layers, 64-token windows: a smoke run, no RESULTS.md

1. Neurons: decode all 30 x 1536 down-projection columns through the final norm and LM head
   (one batched matmul per layer, timed), searching for " dog" in the same pass; clamp the best
   " dog" neuron during generation on "My favourite animal is the" and report p(" dog") and
   the greedy text per clamp value.
2. Neurons, two models: share of up-projection neurons whose top token is unchanged between
   SmolLM2 and copies pruned by magnitude (20%, 50%), on every fifth layer. The paper's
   base-vs-instruct claim (>75% unchanged) cannot be checked offline: the zoo has only the
   instruct model.
3. Heads: per domain (the zoo's held-out Wikipedia vs Python's own stdlib source), sink mass,
   value drain, residual peaks, and the dormant test - exact reruns for every sink head next to
   the one-backward linear estimate on the same tokens (their agreement is reported), plus the
   wall time of the default `weightlab heads` configuration (linear, 2 x 128 tokens per domain).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "Inspect: feature neurons and attention sinks (SmolLM2-135M)"
REPRO = ".venv/bin/python benchmarks/internals.py"
FIG = C.BENCH_DIR / "figures" / "internals.png"
PROMPT = "My favourite animal is the"


def neurons_part(model, tok, layers, out):
    from weightlab.inspect.neurons import NeuronsConfig, clamp_neurons, decode_neurons, token_variants

    dog = token_variants(tok, "dog")
    cpu = time.process_time()
    nmap = decode_neurons(model, NeuronsConfig(layers=layers), token_ids=dog)
    out["decode"] = {"neurons": nmap.neurons, "layers": len(nmap.top_ids), "seconds": nmap.seconds,
                     "cpu_seconds": time.process_time() - cpu,
                     "per_layer": statistics.median(nmap.layer_seconds.values())}
    best = nmap.rows(tok, best_first=True, limit=5)
    out["dog_variants"] = [tok.decode([i]) for i in dog]
    out["dog"] = best
    top = (best[0]["layer"], best[0]["neuron"])
    base = clamp_neurons(model, tok, [top], 0.0, PROMPT, max_new_tokens=1)
    act = max(abs(base["activation_on_prompt"][f"{top[0]}:{top[1]}"]["max"]),
              abs(base["activation_on_prompt"][f"{top[0]}:{top[1]}"]["min"]), 1e-3)
    rows = []
    space_dog = tok(" dog", add_special_tokens=False)["input_ids"]
    for mult in (5, 20, 50):
        r = clamp_neurons(model, tok, [top], mult * act, PROMPT, max_new_tokens=16, watch=space_dog)
        p_dog, p_dog0 = r["watched"][0]["after"], r["watched"][0]["before"]
        rows.append({"value": mult * act, "mult": mult, "p_dog_before": p_dog0, "p_dog_after": p_dog,
                     "text_before": r["before"]["text"], "text_after": r["after"]["text"],
                     "top_after": r["after"]["top"][0]["token"]})
    out["clamp"] = {"neuron": f"{top[0]}:{top[1]}", "activation_max": act, "rows": rows}


def compare_part(model, layers, sparsities, out):
    import copy

    from weightlab.compress import prune
    from weightlab.inspect.neurons import NeuronsConfig, compare_neurons, decode_neurons

    out["compare"] = []
    cfg = NeuronsConfig(vector="up", layers=layers, top_k=1)
    base = decode_neurons(model, cfg)
    for s in sparsities:
        pruned = copy.deepcopy(model)
        prune(pruned, "magnitude", s)
        r = compare_neurons(base, pruned, cfg)
        out["compare"].append({"sparsity": s, "same": r["same_top_token"], "neurons": r["neurons"],
                               "seconds": r["seconds"]})
        del pruned


def heads_part(model, tok, windows, seqlen, default_windows, out):
    from weightlab.inspect.heads import HeadsConfig, analyze_heads

    t = time.perf_counter()
    lin = analyze_heads(model, tok, HeadsConfig(windows=default_windows, seqlen=seqlen))
    out["heads_default_s"] = time.perf_counter() - t
    out["heads_linear"] = lin
    t = time.perf_counter()
    rep = analyze_heads(model, tok, HeadsConfig(windows=windows, seqlen=seqlen, dormant_test="exact"))
    out["heads_exact_s"] = time.perf_counter() - t
    out["heads"] = rep


def agreement(rep):
    """Over the sink heads of the exact run: state from the linear estimate vs the exact rerun."""
    from weightlab.inspect.heads import HeadsConfig, classify

    cfg = HeadsConfig(**rep.config)
    tested = [r for r in rep.heads if r["dloss"] is not None]
    same = sum(classify(r["sink_mass"], r["dloss_linear"] / rep.domains[r["domain"]]["loss"], cfg) == r["state"]
               for r in tested)
    xs, ys = [r["dloss"] for r in tested], [r["dloss_linear"] for r in tested]
    corr = statistics.correlation(xs, ys) if len(tested) > 2 else float("nan")
    return same, len(tested), corr


def figure(rep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    doms = list(rep.domains)
    fig, axes = plt.subplots(1, len(doms) + 2, figsize=(4.2 * (len(doms) + 2), 5.2))
    for ax, dom in zip(axes, doms):
        g = np.array(rep.grid(dom, "sink_mass"), dtype=float)
        im = ax.imshow(g, aspect="auto", cmap="Reds", vmin=0, vmax=1)
        for r in rep.heads:
            if r["domain"] == dom and r["state"] == "dormant":
                ax.text(r["head"], r["layer"], "D", ha="center", va="center", fontsize=7)
        ax.set_title(f"{dom}: attention on first token\n(D = dormant: sink, |dloss| < 1%)", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[len(doms) - 1], fraction=0.05)
    ax = axes[len(doms)]
    for dom, mk in zip(doms, "ox"):
        t = [r for r in rep.heads if r["domain"] == dom and r["dloss"] is not None]
        ax.scatter([100 * r["rel_dloss"] for r in t], [100 * r["dloss_linear"] / rep.domains[dom]["loss"] for r in t],
                   s=10, marker=mk, label=dom)
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k:", lw=0.8)
    ax.set_xlabel("exact loss change of sink heads (% of loss)")
    ax.set_ylabel("linear estimate (%)")
    ax.set_title("dormant test: one-backward estimate vs rerun", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[len(doms) + 1]
    for dom in doms:
        lr = [r for r in rep.layers if r["domain"] == dom]
        ax.semilogy([r["layer"] for r in lr], [r["resid_first"] for r in lr], label=f"{dom}: first token")
        ax.semilogy([r["layer"] for r in lr], [r["resid_median"] for r in lr], "--", label=f"{dom}: median token")
    ax.set_xlabel("layer")
    ax.set_ylabel("residual-stream norm")
    ax.set_title("residual-state peak", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(out, args) -> str:
    d, cl = out["decode"], out["clamp"]
    rep, lin = out["heads"], out["heads_linear"]
    same, tested, corr = agreement(rep)
    lines = [
        f"Date: {C.today()}. Machine: {C.machine_line()} (shared, noisy), {args.threads} torch thread(s). "
        f"torch {C.package_version('torch')}, transformers {C.package_version('transformers')}. "
        f"Model: the zoo's SmolLM2-135M-Instruct (fp32 dequantized from Q4_1; 30 layers x 9 heads, MLP width 1536). "
        f"Reproduce: `{REPRO}`.",
        "",
        "**Neurons.** Down-projection columns (what each neuron writes to the residual stream) pushed through the "
        f"model's final RMSNorm and LM head: {d['neurons']:,} neurons of {d['layers']} layers decoded in "
        f"{d['seconds']:.1f} s wall, {d['cpu_seconds']:.1f} s CPU on one thread "
        f"({d['per_layer']:.2f} s wall per layer, "
        "median; the cost is the (1536 x 576) x (576 x 49152) matmul per layer; on this shared machine CPU time is the "
        "better guide to an idle one). Best matches for " + ", ".join(repr(v) for v in out["dog_variants"]) + ":",
        "",
        C.md_table(["layer:neuron", "p(dog)", "top tokens"],
                   [[f"{r['layer']}:{r['neuron']}", f"{r['score']:.3f}", " ".join(repr(t) for t in r["top_tokens"])]
                    for r in out["dog"]]),
        "",
        f"Clamping neuron {cl['neuron']} (its activation on the prompt peaks at {cl['activation_max']:.2f}) at every "
        f"position, prompt {PROMPT!r}:",
        "",
        C.md_table(["clamp value", "p(' dog') before", "after", "top next token after", "greedy text after"],
                   [[f"{r['value']:.1f} ({r['mult']}x)", f"{r['p_dog_before']:.4f}", f"{r['p_dog_after']:.4f}",
                     repr(r["top_after"]), repr(r["text_after"])] for r in cl["rows"]]),
        "",
        f"Greedy text without clamping: {cl['rows'][0]['text_before']!r}.",
        "",
        "**Neurons, two models** (up-projection rows as in the paper, layers " + ",".join(map(str, args.compare_layers))
        + "): share of neurons whose top token is unchanged after magnitude pruning: "
        + "; ".join(f"{100 * c['sparsity']:.0f}% sparsity: {c['same']:.1%} of {c['neurons']:,}" for c in out["compare"])
        + ". The paper's claim (>75% unchanged between Llama 3.1 8B base and instruct) cannot be checked offline: "
        "the zoo ships only SmolLM2's instruct model.",
        "",
        f"**Heads.** Windows of {args.seqlen} tokens led by the BOS token; domains: held-out Wikipedia (gensim) and "
        "Python's stdlib source (" + ", ".join(__import__("weightlab.inspect.heads", fromlist=["x"]).CODE_MODULES[:4])
        + ", ...). Sink = mean attention on the first token >= 0.5; dormant = sink and |loss change| < 1% of the "
        "domain loss when the head's attention is moved entirely to the first token (weightlab's thresholds).",
        "",
        C.md_table(["domain", "loss", "tokens", "sink heads", "dormant (exact)", "active", "dormant (linear, "
                    f"{args.default_windows} windows)", "exact test time"],
                   [[dom, f"{i['loss']:.3f}", i["tokens"], f"{i['sinks']}/{i['heads']}", i["dormant"], i["active"],
                     lin.domains[dom]["dormant"], f"{i['seconds']:.0f} s"] for dom, i in rep.domains.items()]),
        "",
    ]
    doms = list(rep.domains)
    if len(doms) == 2:
        a, b = doms
        st = {(r["domain"], r["layer"], r["head"]): r["state"] for r in rep.heads}
        keys = sorted({(r["layer"], r["head"]) for r in rep.heads})
        only = {d: [k for k in keys if st[(d, *k)] == "dormant" and st[(doms[1 - doms.index(d)], *k)] != "dormant"]
                for d in doms}
        both = [k for k in keys if st[(a, *k)] == st[(b, *k)] == "dormant"]
        lines += [f"Dormant on both domains: {len(both)} heads; only on {a}: {len(only[a])} "
                  f"({', '.join(f'L{x}H{y}' for x, y in only[a][:8])}); only on {b}: {len(only[b])} "
                  f"({', '.join(f'L{x}H{y}' for x, y in only[b][:8])}).", ""]
    pk = [r for r in rep.layers if r["domain"] == doms[0]]
    top = max(pk, key=lambda r: r["peak_ratio"])
    drains = [r["drain_ratio"] for r in rep.heads if r["sink"]]
    lines += [
        f"Residual-state peak: after layer {top['layer']} the first token's residual norm is {top['resid_first']:.0f} "
        f"vs a median of {top['resid_median']:.0f} for the other tokens ({top['peak_ratio']:.0f}x); the peak appears "
        f"after layer {next(r['layer'] for r in pk if r['peak_ratio'] > 20)} and lasts to the last layers. Value "
        f"drain: on sink heads the first token's value (through o_proj) has a median norm ratio of "
        f"{statistics.median(drains):.2f} to the other tokens' median.",
        "",
        f"Linear estimate vs exact rerun over the {tested} tested (sink) heads: the same state for {same} "
        f"({same / max(1, tested):.0%}), correlation of the loss changes {corr:.2f}. Wall time: the default "
        f"`weightlab heads` configuration (linear, {args.default_windows} x {args.seqlen} tokens, both domains) "
        f"{out['heads_default_s']:.0f} s; the exact test of the sink heads ({args.windows} x {args.seqlen} tokens) "
        f"{out['heads_exact_s']:.0f} s.",
        "",
        f"![sinks, dormant heads and residual peaks](figures/{FIG.name})",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a shared 2-core box one is fastest)")
    p.add_argument("--windows", type=int, default=1, help="windows per domain for the exact dormant test")
    p.add_argument("--default-windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    args = p.parse_args(argv)
    os.environ.setdefault("WEIGHTLAB_PROGRESS", "0")
    import torch

    torch.set_num_threads(args.threads)
    from weightlab.io.hf import load_causal_lm
    from weightlab.zoo import smollm2

    model, tok = load_causal_lm(smollm2())
    n = len(model.model.layers)
    layers = [0, n // 2, n - 1] if args.quick else None
    args.compare_layers = [n // 2] if args.quick else list(range(0, n, 5))
    if args.quick:
        args.seqlen = 64
    out: dict = {}
    t0 = time.perf_counter()
    neurons_part(model, tok, layers, out)
    print(f"neurons: {out['decode']['seconds']:.1f} s; best dog neuron {out['clamp']['neuron']}", flush=True)
    compare_part(model, args.compare_layers, (0.2, 0.5) if not args.quick else (0.5,), out)
    print(f"compare: {[round(c['same'], 3) for c in out['compare']]}", flush=True)
    heads_part(model, tok, args.windows, args.seqlen, args.default_windows, out)
    print(f"heads: default {out['heads_default_s']:.0f} s, exact {out['heads_exact_s']:.0f} s", flush=True)
    figure(out["heads"], FIG if not args.quick else Path("/tmp/internals-quick.png"))
    body = report(out, args)
    print(body)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not (args.quick or args.no_write):
        C.write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
