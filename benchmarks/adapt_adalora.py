"""AdaLoRA on SmolLM2-135M: weightlab's training step (with the rank allocator) vs PEFT's AdaLoRA.

    .venv/bin/python benchmarks/adapt_adalora.py              # ~7 min on 2 busy cores; updates RESULTS.md
    .venv/bin/python benchmarks/adapt_adalora.py --no-write   # print the section only

One training step as PEFT documents it: forward with labels (the orthogonal regularizer added to the
loss: PEFT's CAUSAL_LM wrapper does it in forward, weightlab adds ``adapt.regularizers``), backward,
AdamW step, then the rank allocator (PEFT ``update_and_allocate``, weightlab ``adapt.step_hooks``)
before the gradients are cleared. PEFT's defaults (init_r 12, target_r 8, alpha 8, beta 0.85,
orth_reg_weight 0.5) on the attention and MLP projections in fp32, tinit 0 so every step updates the
sensitivities and masks to the falling budget (the allocator's most expensive path). Each tool runs in
its own child process, the order alternates between rounds, the step time is the median of the timed
steps after one warm-up step, and the verdict is ratio_verdict over the per-round ratios (weightlab /
PEFT, target <= 1x). The final mask and the losses are printed so a run that diverged shows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "Adapt: AdaLoRA vs PEFT step time"
REPRO = ".venv/bin/python benchmarks/adapt_adalora.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOOLS = ("weightlab", "peft")


def child(tool: str, batch: int, seqlen: int, steps: int, threads: int) -> dict:
    os.environ["WEIGHTLAB_PROGRESS"] = "0"
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    from weightlab import adapt, zoo
    from weightlab.io.hf import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm(zoo.smollm2())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (batch, seqlen), generator=g)
    total = steps + 2  # every timed step is inside the budget phase
    if tool == "peft":
        import peft

        model = peft.get_peft_model(model, peft.AdaLoraConfig(target_modules=TARGETS, total_step=total,
                                                               task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

        def loss_fn():
            return model(input_ids=x, labels=x).loss

        def allocate(step):
            model.base_model.update_and_allocate(step)
    else:
        adapt.attach(model, "adalora", targets=TARGETS, total_step=total)
        params = adapt.trainable_parameters(model)
        opt = adapt.make_optimizer(model, 1e-3)

        def loss_fn():
            return model(input_ids=x, labels=x).loss + adapt.regularizers(model)

        def allocate(step):
            adapt.step_hooks(model, step, total)
    model.train()
    times, cpus, losses = [], [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn()
        loss.backward()
        opt.step()
        allocate(i + 1)
        opt.zero_grad(set_to_none=True)
        if i:  # the first step pays one-time allocations
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
    if tool == "peft":
        kept = sum(sum(v) for v in model.peft_config["default"].rank_pattern.values())
    else:
        from weightlab.adapt.adalora import rank_pattern

        kept = sum(sum(v) for v in rank_pattern(model).values())
    return {"step_s": statistics.median(times), "steps": times, "cpu_s": statistics.median(cpus), "losses": losses,
            "kept": kept, "trainable": sum(p.numel() for p in params)}


def run(args) -> dict:
    out: dict = {t: [] for t in TOOLS}
    loads = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        for tool in (TOOLS if rnd % 2 == 0 else TOOLS[::-1]):
            C.log(f"round {rnd + 1}: {tool}")
            cmd = [sys.executable, __file__, "_child", tool, "--batch", str(args.batch), "--seqlen",
                   str(args.seqlen), "--steps", str(args.steps), "--threads", str(args.threads)]
            r = C.run_measured(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).check(tool)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["peak_rss_mib"] = r.peak_rss_mib
            out[tool].append(res)
            loads.append(os.getloadavg()[0])
    out["_load"] = loads
    return out


def report(args, res: dict) -> str:
    import peft

    w, p = res["weightlab"], res["peft"]
    ratios = [a["step_s"] / b["step_s"] for a, b in zip(w, p)]
    rows = [[f"round {i + 1}", f"{a['step_s']:.3f}", f"{b['step_s']:.3f}", C.fmt_ratio(a["step_s"] / b["step_s"]),
             f"{a['cpu_s']:.3f} / {b['cpu_s']:.3f}", C.fmt_ratio(a["cpu_s"] / b["cpu_s"]),
             f"{a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f}", f"{a['kept']} / {b['kept']}"]
            for i, (a, b) in enumerate(zip(w, p))]
    table = C.md_table(["pair", "weightlab step (s)", "PEFT step (s)", "wall ratio", "CPU s per step (wl / PEFT)",
                        "CPU ratio", "peak RSS MiB (wl / PEFT)", "kept triplets (wl / PEFT)"], rows)
    cpu_ratios = [a["cpu_s"] / b["cpu_s"] for a, b in zip(w, p)]
    rss = [a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(w, p)]
    return "\n".join([
        f"{C.today()}, {C.machine_line()}; PEFT {peft.__version__}, torch {C.package_version('torch')}. "
        + C.load_sentence(res["_load"]),
        "",
        f"AdaLoRA (PEFT defaults: init_r 12, target_r 8, alpha 8) on SmolLM2-135M's seven projections, fp32, batch "
        f"{args.batch} x {args.seqlen} tokens, {args.threads} thread(s); one step = forward with the orthogonal "
        "regularizer, backward, AdamW, rank allocator (tinit 0: sensitivities and a global mask every step); "
        f"median of {args.steps} timed steps after a warm-up, each tool in its own process, order alternating.",
        "",
        table,
        "",
        f"Verdict, wall step time (weightlab <= 1x PEFT per pair): {C.ratio_verdict(ratios, 1.0)}; CPU seconds: "
        f"{C.ratio_verdict(cpu_ratios, 1.0)}. Peak RSS {min(rss):.3f}-{max(rss):.3f}x PEFT's (the whole process: "
        f"model, activations, optimizer). Trainable parameters: {w[0]['trainable']:,} (weightlab) / "
        f"{p[0]['trainable']:,} (PEFT). First-step loss {w[0]['losses'][0]:.4f} / {p[0]['losses'][0]:.4f} (the same "
        "seed gives both the same initial tensors); the kept-triplet counts are the budget after the last timed step.",
        "",
        f"Reproduce: `{REPRO}`",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)  # a shared machine: one core each
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    res = run(args)
    body = report(args, res)
    print(body)
    if not args.no_write:
        C.write_section(SECTION, body)
        C.log(f"wrote {C.RESULTS_MD}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("tool")
        ap.add_argument("--batch", type=int)
        ap.add_argument("--seqlen", type=int)
        ap.add_argument("--steps", type=int)
        ap.add_argument("--threads", type=int)
        a = ap.parse_args()
        print(json.dumps(child(a.tool, a.batch, a.seqlen, a.steps, a.threads)))
    else:
        main()
