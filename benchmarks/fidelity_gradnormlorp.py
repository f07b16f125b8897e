"""Fidelity: GradNormLoRP optimizer memory vs LoRA and full fine-tuning, and accuracy vs LoRA at rank 8.

    .venv/bin/python benchmarks/fidelity_gradnormlorp.py            # 3 rounds + 3 seeds, ~5 min on 2 busy cores
    .venv/bin/python benchmarks/fidelity_gradnormlorp.py --rounds 1 --seeds 1 --no-write

1. Memory: SmolLM2-135M-Instruct (zoo, fp32), one training step (forward, backward, optimizer step) on
   the same 2 x 64 token batch. Tools, each in its own child process, the order alternating between
   rounds: full fine-tuning (torch AdamW over every parameter), LoRA r=8 alpha=16 on the seven
   projections (AdamW), GradNormLoRP r=8 alpha=16 on the same projections with its default projected
   AdamW (projection rank r // 2 = 4), and GradNormLoRP with the paper's projection rank 128 (>= r: a
   complete projection). Optimizer memory = bytes of every tensor in the optimizer's state
   (weightlab.adapt.gradnormlorp.state_bytes), checked against the formula from the layer shapes; peak
   RSS of the child beside it. This is our own script: benchmarks/adapt.py (step time vs PEFT) is untouched.
2. Accuracy: an MLP (64-128-128-10) trained on sklearn digits is fine-tuned to a shifted task (a fixed
   pixel permutation and labels shifted by 3) with each adapter at r=8 on its three Linear layers, the same
   lr, steps and batches, 3 seeds; held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "Fidelity: GradNormLoRP"
REPRO = ".venv/bin/python benchmarks/fidelity_gradnormlorp.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOOLS = ("full", "lora", "gradnormlorp", "gradnormlorp-128")
R, ALPHA, LR = 8, 16.0, 3e-3


def child(tool: str) -> dict:
    import resource

    import torch

    from weightlab import adapt, zoo
    from weightlab.adapt.gradnormlorp import state_bytes
    from weightlab.io.hf import load_causal_lm

    torch.set_num_threads(1)
    model, _ = load_causal_lm(zoo.smollm2())
    shapes = [tuple(m.weight.shape) for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    if tool == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        kw = {"proj_rank": 128} if tool == "gradnormlorp-128" else {}
        adapt.attach(model, tool.split("-")[0], targets=TARGETS, r=R, alpha=ALPHA, **kw)
        opt = adapt.make_optimizer(model, 1e-4)
    x = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    step_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tool": tool, "state_bytes": state_bytes(opt), "formula": formula(tool, shapes, model),
            "trainable": trainable, "step_s": step_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def formula(tool: str, shapes, model) -> int:
    """Optimizer-state bytes from the shapes (fp32): AdamW keeps exp_avg, exp_avg_sq and a step scalar per
    tensor; the projected AdamW keeps m, v in the projected space plus the r x k projector per factor."""
    if tool == "full":
        ps = [p for p in model.parameters()]
        return 4 * sum(2 * p.numel() + 1 for p in ps)
    if tool == "lora":
        return 4 * sum(2 * R * (o + i) + 2 for o, i in shapes)
    k = min(R, 128 if tool.endswith("128") else R // 2)
    # A (r x in, r < in): U_k^T G is k x in; B (out x r): G V_k is out x k; magnitude m (out): plain Adam
    return 4 * sum(2 * k * i + 2 * o * k + 2 * R * k + 2 * o for o, i in shapes)


def memory(rounds: int):
    results, loads = {t: [] for t in TOOLS}, []
    for rnd in range(rounds):
        order = TOOLS if rnd % 2 == 0 else tuple(reversed(TOOLS))
        for tool in order:
            loads.append(os.getloadavg()[0])
            out = subprocess.run([C.python_exe(), __file__, "--child", tool], capture_output=True, text=True,
                                 env={**os.environ, "WEIGHTLAB_PROGRESS": "0"})
            if out.returncode:
                raise RuntimeError(f"{tool} child failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[tool].append(res)
            C.log(f"round {rnd} {tool}: state {res['state_bytes'] / 2**20:.2f} MiB (formula "
                  f"{res['formula'] / 2**20:.2f}), rss {res['peak_rss_mib']:.0f} MiB")
            loads.append(os.getloadavg()[0])
    return results, loads


def accuracy(seeds: int) -> dict:
    import copy
    import warnings

    import torch
    from torch import nn

    from weightlab import adapt
    from weightlab.zoo.tabular import digits

    torch.set_num_threads(1)
    ds = digits(seed=0)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(7))
    xt_tr, yt_tr, xt_te, yt_te = ds.x_train[:, perm], (ds.y_train + 3) % 10, ds.x_test[:, perm], (ds.y_test + 3) % 10
    # GradNormLoRP scales its projected updates by proj_scale = 0.25: at the same lr its steps are 4x
    # smaller, so it also runs at lr / 0.25 (the paper pairs the scale with a larger lr)
    methods = {"LoRA": ("lora", {}, LR), "DoRA": ("dora", {}, LR),
               "GradNormLoRP (proj rank 4)": ("gradnormlorp", {}, LR),
               "GradNormLoRP (proj rank 8 = r, complete)": ("gradnormlorp", {"proj_rank": R}, LR),
               "GradNormLoRP (proj rank 4, lr / 0.25)": ("gradnormlorp", {}, LR / 0.25)}
    out = {m: [] for m in methods}
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.Adam(base.parameters(), lr=1e-3)
        for _ in range(600):
            idx = torch.randint(0, len(ds.y_train), (64,))
            opt.zero_grad()
            nn.functional.cross_entropy(base(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
        for name, (meth, kw, lr) in methods.items():
            m = copy.deepcopy(base)
            adapt.attach(m, meth, targets=["0", "2", "4"], r=R, alpha=ALPHA, seed=seed, **kw)
            with warnings.catch_warnings():  # the complete projection's warning is expected here
                warnings.simplefilter("ignore")
                opt = adapt.make_optimizer(m, lr)
            g = torch.Generator().manual_seed(100 + seed)
            for _ in range(400):
                idx = torch.randint(0, len(yt_tr), (64,), generator=g)
                opt.zero_grad()
                nn.functional.cross_entropy(m(xt_tr[idx]), yt_tr[idx]).backward()
                opt.step()
            with torch.no_grad():
                out[name].append(float((m(xt_te).argmax(1) == yt_te).float().mean()))
            C.log(f"seed {seed} {name}: {out[name][-1]:.3f}")
    return out


def render(mem, loads, acc, rounds, wall) -> str:
    def one(tool):
        vals = {r["state_bytes"] for r in mem[tool]}
        return mem[tool][0], len(vals) == 1
    full, lora = one("full")[0]["state_bytes"], one("lora")[0]["state_bytes"]
    rows = []
    for tool, label in (("full", "full fine-tuning (AdamW)"), ("lora", "LoRA r=8 (AdamW)"),
                        ("gradnormlorp", "GradNormLoRP r=8, default projection rank 4"),
                        ("gradnormlorp-128", "GradNormLoRP r=8, paper's projection rank 128 (complete)")):
        r, stable = one(tool)
        rss = [x["peak_rss_mib"] for x in mem[tool]]
        rows.append([label, f"{r['trainable']:,}", f"{r['state_bytes'] / 2**20:.2f}",
                     "yes" if r["state_bytes"] == r["formula"] and stable else f"no ({r['formula'] / 2**20:.2f})",
                     f"{100 * (1 - r['state_bytes'] / full):.2f}%", f"{r['state_bytes'] / lora:.3f}x",
                     f"{statistics.median(rss):.0f}"])
    g, g128 = one("gradnormlorp")[0]["state_bytes"], one("gradnormlorp-128")[0]["state_bytes"]
    arow = [[k, f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}",
             " ".join(f"{x:.3f}" for x in v)] for k, v in acc.items()]
    gl = acc["GradNormLoRP (proj rank 4)"]
    wins = sum(a > b for a, b in zip(gl, acc["LoRA"]))
    mean_d = statistics.mean(gl) - statistics.mean(acc["LoRA"])
    g4 = acc["GradNormLoRP (proj rank 4, lr / 0.25)"]
    wins4 = sum(a > b for a, b in zip(g4, acc["LoRA"]))

    def verdict(w, n):
        return "reproduced" if w == n else "not reproduced" if w == 0 else "not shown"
    return "\n".join([
        f"Measured {C.today()} with `{REPRO}` ({rounds} memory rounds, {len(gl)} accuracy seeds, "
        f"{wall / 60:.1f} min). {C.machine_line()}. Shared, busy machine (1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} on {C.cpu_count()} cores): no timing is claimed; state bytes are "
        "exact and load-independent.",
        "",
        "**Memory.** Claim (Huang et al. 2024, arXiv 2412.19616): the gradient projection shrinks optimizer "
        "memory (8-bit GradNormLoRP: -89.5% optimizer memory in LLaMA-7B pretraining). Setting: "
        "SmolLM2-135M-Instruct, fp32, the seven attention/MLP projections, one step on a 2 x 64 token batch, "
        "each tool in its own process, order alternating; optimizer memory = bytes of all tensors in the "
        "optimizer state after the step (projectors included), identical in every round.",
        "",
        C.md_table(["tool", "trainable params", "optimizer state (MiB)", "= formula", "saved vs full AdamW",
                    "vs LoRA", "peak RSS (MiB)"], rows),
        "",
        f"- At its defaults GradNormLoRP keeps {g / lora:.3f}x LoRA's optimizer state and "
        f"{100 * (1 - g / full):.2f}% less than full AdamW; with the paper's rank 128 the projection of the "
        f"rank-8 factors is complete and the state is {g128 / lora:.3f}x LoRA's (the old default saved nothing). "
        f"**Reproduced in kind** (the projection really shrinks the state; the paper's -89.5% is for 8-bit "
        "states in full-weight pretraining, a setting not run here; fp32 adapter fine-tuning saves more "
        "against full AdamW because the trainable set itself is small).",
        "",
        "**Accuracy.** Claim: at rank 8 GradNormLoRP beats LoRA (RoBERTa-base GLUE average 80.65 vs 79.23). "
        "Setting (small stand-in, GLUE not run): an MLP 64-128-128-10 trained on sklearn digits, fine-tuned to "
        "a shifted task (fixed pixel permutation, labels + 3 mod 10) with r=8, alpha=16 adapters on its three "
        "Linear layers, lr 3e-3 (GradNormLoRP also at 1.2e-2 = lr / proj_scale), 400 steps of batch 64 and the "
        "same batches for every method; "
        "held-out accuracy per seed.",
        "",
        C.md_table(["method", "test accuracy (mean ± std)", "per seed"], arow),
        "",
        f"- GradNormLoRP (default projection) vs LoRA: higher in {wins}/{len(gl)} seeds, mean difference "
        f"{mean_d:+.3f} (same lr): **{verdict(wins, len(gl))}**; at lr / proj_scale: higher in {wins4}/{len(g4)} "
        f"seeds, mean difference {statistics.mean(g4) - statistics.mean(acc['LoRA']):+.3f}: "
        f"**{verdict(wins4, len(g4))}** (seeds on both sides = not shown). A stand-in, not GLUE.",
        "- Peak RSS: GradNormLoRP's forward computes the row norms ||W0 + sBA|| from out x r and r x r "
        "products instead of materializing W' (before that change its peak RSS in this setting was 3640 MiB, "
        "above full fine-tuning's).",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    t0 = time.time()
    mem, loads = memory(args.rounds)
    acc = accuracy(args.seeds)
    body = render(mem, loads, acc, args.rounds, time.time() - t0)
    print(body)
    if not args.no_write:
        C.write_section(SECTION, body)
        C.log(f"wrote section {SECTION!r} to {C.RESULTS_MD}")


if __name__ == "__main__":
    main()
