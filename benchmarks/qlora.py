"""LoRA on a 4-bit compressed-tensors base (QLoRA-style) vs LoRA on the bf16 base: memory, step time, folds.

    .venv/bin/python benchmarks/qlora.py              # ~40 min on 2 busy cores; updates RESULTS.md
    .venv/bin/python benchmarks/qlora.py --no-write   # print the section only
    .venv/bin/python benchmarks/qlora.py --phase steps & .venv/bin/python benchmarks/qlora.py --phase fold

Bases: the zoo's SmolLM2-135M-Instruct cast to bf16 (the "bf16 base"), and that folder quantized by
weightlab itself to compressed-tensors W4A16 (RTN, symmetric int4, group 64: data-free, as bitsandbytes'
NF4 is; group 128 does not divide SmolLM2's 576 hidden columns and CT needs whole groups). Speed/memory:
each configuration in its own child process (peak RSS of the whole process: Python,
torch, transformers, the model, LoRA r=16 on the seven projections, AdamW state, activations), the same
compute dtype for both (float32 by default: weightlab tune's, and this CPU has no bf16 matrix units - a bf16
step of the 4-bit model took 85 s against seconds in float32 on the busy machine), batch x seqlen tokens of the zoo's Wikipedia, median of the timed steps after one warm-up step,
order alternating over the rounds. Fold: one child fine-tunes LoRA on the 4-bit base (fp32 compute,
``adapt.training.tune``), then folds it dense and re-quantized (RTN on the base's grid) with
``adapt.qbase.fold_job`` and reports held-out perplexity of every model. PEFT's QLoRA (bitsandbytes
4-bit layers) needs CUDA, which this machine lacks, so there is no anchor run here.
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

SECTION = "Adapt: LoRA on a 4-bit base (QLoRA-style)"
KEEP = "folded + re-quantized on the base's scales (W4 g64)"
REPRO = ".venv/bin/python benchmarks/qlora.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("bf16", "w4")
GROUP = 64  # 576 hidden columns: 128 is not a whole number of groups (compressed-tensors refuses it)


def prepare(work: Path) -> tuple[Path, Path]:
    """(bf16 folder, W4 g64 CT folder), made once under ``work``."""
    import torch

    from weightlab import zoo
    from weightlab.compress.jobs import quantize_job
    from weightlab.io.hf import load_causal_lm

    bf16, ct = work / "smollm2-bf16", work / "smollm2-w4g64-ct"
    if not (bf16 / "config.json").is_file():
        m, tok = load_causal_lm(zoo.smollm2(), dtype=torch.bfloat16)
        m.save_pretrained(str(bf16))
        tok.save_pretrained(str(bf16))
    if not (ct / "config.json").is_file():
        quantize_job(bf16, ct, "rtn", 4, GROUP, sym=True, no_eval=True, device="cpu")
    return bf16, ct


def child_step(mode: str, folder: str, batch: int, seqlen: int, steps: int, threads: int, dtype: str) -> dict:
    import torch

    dt = getattr(torch, dtype)

    torch.set_num_threads(threads)
    from weightlab import adapt
    from weightlab.io.refs import load_text

    t0 = time.perf_counter()
    if mode == "w4":
        from weightlab.adapt.qbase import load_base, memory_report

        model, tok = load_base(folder, dt)
        mem = memory_report(model)
    else:
        from weightlab.io.hf import load_causal_lm

        model, tok = load_causal_lm(folder, dtype=dt)
        mem = None
    load_s = time.perf_counter() - t0
    adapt.attach(model, "lora", targets=TARGETS, r=16, alpha=16, seed=0)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ids = tok(load_text("wiki", "calib")[:200_000], return_tensors="pt")["input_ids"][0]
    g = torch.Generator().manual_seed(0)
    opt = adapt.make_optimizer(model, 2e-4)
    model.train()
    times, losses = [], []
    for i in range(steps + 1):
        starts = torch.randint(0, ids.numel() - seqlen, (batch,), generator=g)
        x = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    return {"step_s": statistics.median(times), "steps": times, "losses": losses, "load_s": load_s,
            "model_bytes": model_bytes, "memory": mem, "trainable": adapt.count_trainable(model),
            "cpu_s": time.process_time(), "self_peak_rss_mib": _self_peak_mib()}


def _self_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_fold(ct: str, bf16: str, work: str, steps: int, batch: int, seqlen: int, lr: float, eval_tokens: int,
               threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from weightlab import adapt
    from weightlab.adapt.qbase import fold_job, load_base
    from weightlab.adapt.training import tune
    from weightlab.engine.evaluate import perplexity
    from weightlab.io.hf import load_causal_lm
    from weightlab.io.quantized_linear import load_quantized_causal_lm
    from weightlab.io.refs import load_text

    text = load_text("wiki", "heldout")
    ppl = {}

    def score(name, model, tok):
        with torch.no_grad():
            ppl[name] = perplexity(model, tok, text, max_tokens=eval_tokens)["perplexity"]

    m, tok = load_causal_lm(bf16, dtype=torch.float32)
    score("bf16 base", m, tok)
    del m
    q, tok = load_base(ct, torch.float32)
    score("4-bit base", q, tok)
    run = Path(work) / "tune"
    t0 = time.perf_counter()
    res = tune(q, tok, "lora", "wiki", rank=16, targets=TARGETS, steps=steps, lr=lr, batch_size=batch,
               seqlen=seqlen, out=run, resume=False, merged=False, method_config={"alpha": 16, "seed": 0},
               progress=False)
    tune_s = time.perf_counter() - t0
    score("4-bit base + LoRA (unfolded)", q, tok)
    del q
    folds = {}
    for rq, name in ((None, "folded dense (bf16)"), ("rtn", "folded + re-quantized (RTN W4 g64)"),
                     ("rtn-keep-scales", KEEP)):
        out = Path(work) / f"fold-{rq or 'dense'}"
        folds[name] = fold_job(run / "adapter", ct, out, requantize=rq, force=True)
        m, tok = (load_causal_lm(out, dtype=torch.float32) if rq is None else
                  load_quantized_causal_lm(out, torch.float32))
        score(name, m, tok)
        del m
    d, tok = load_causal_lm(bf16, dtype=torch.float32)  # the same adapter on the original bf16 weights
    adapt.load(d, run / "adapter")
    score("bf16 base + the same LoRA", d, tok)
    return {"perplexity": ppl, "tune": {k: res[k] for k in ("heldout_before", "heldout_after", "trainable")},
            "tune_s": tune_s, "folds": folds, "cpu_s": time.process_time()}


def run_steps(args, bf16: Path, ct: Path) -> dict:
    out: dict = {m: [] for m in MODES}
    loads = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
            C.log(f"round {rnd + 1}: {mode}")
            cmd = [sys.executable, __file__, "_step", mode, str(ct if mode == "w4" else bf16), "--batch",
                   str(args.batch), "--seqlen", str(args.seqlen), "--steps", str(args.steps), "--threads",
                   str(args.threads), "--dtype", args.dtype]
            r = C.run_measured(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                         "WEIGHTLAB_PROGRESS": "0"}).check(mode)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["peak_rss_mib"], res["wall_s"] = r.peak_rss_mib, r.wall_s
            out[mode].append(res)
            with open(Path(args.work_dir) / "steps-runs.jsonl", "a") as fh:  # survives a run cut short
                fh.write(json.dumps({"date": C.today(), "round": rnd + 1, "mode": mode, **res}) + "\n")
            loads.append(os.getloadavg()[0])
    out["_load"] = loads
    return out


def run_fold(args, bf16: Path, ct: Path, work: Path) -> dict:
    C.log("fine-tune on the 4-bit base, fold both ways, perplexities")
    cmd = [sys.executable, __file__, "_fold", str(ct), str(bf16), str(work), "--steps", str(args.tune_steps),
           "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--lr", str(args.lr), "--eval-tokens",
           str(args.eval_tokens), "--threads", str(args.threads)]
    r = C.run_measured(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                 "WEIGHTLAB_PROGRESS": "0"}).check("fold")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["peak_rss_mib"], res["wall_s"], res["_load"] = r.peak_rss_mib, r.wall_s, os.getloadavg()[0]
    return res


def report(steps_blob: dict, fold_blob: dict | None) -> str:
    """The section from the two phases' saved results (each with the arguments and date of its own run)."""
    args, steps = argparse.Namespace(**steps_blob["args"]), steps_blob["result"]
    fold = fold_blob["result"] if fold_blob else None
    b, w = steps["bf16"], steps["w4"]
    mib = 2 ** 20
    rows = [[f"round {i + 1}", f"{x['peak_rss_mib']:.0f} / {y['peak_rss_mib']:.0f}",
             f"{y['peak_rss_mib'] - x['peak_rss_mib']:+.0f}", f"{x['step_s']:.2f} / {y['step_s']:.2f}",
             C.fmt_ratio(y["step_s"] / x["step_s"]), f"{x['cpu_s']:.0f} / {y['cpu_s']:.0f}"]
            for i, (x, y) in enumerate(zip(b, w))]
    table = C.md_table(["pair", "peak RSS MiB (dense / 4-bit)", "4-bit - dense MiB", "step s (dense / 4-bit)",
                        "step ratio 4-bit / dense", "child CPU s, whole run (dense / 4-bit)"], rows)
    mem = w[0]["memory"]
    ratios = [y["step_s"] / x["step_s"] for x, y in zip(b, w)]
    lines = [
        f"{steps_blob['date']}, {C.machine_line()}; torch {C.package_version('torch')}, transformers "
        f"{C.package_version('transformers')}, compressed-tensors {C.package_version('compressed-tensors')}. "
        + C.load_sentence(steps["_load"] + ([fold["_load"]] if fold else [])),
        "",
        f"SmolLM2-135M-Instruct (zoo) in bf16 vs the same model quantized by `weightlab quantize -m rtn -b 4 -g "
        f"{GROUP}` to compressed-tensors (symmetric int4; group 128 does not divide the 576 hidden columns). LoRA r=16 alpha 16 on the seven projections "
        f"({w[0]['trainable']:,} trainable), AdamW, {args.dtype} compute (the dense base's weights held in it, the "
        f"4-bit one's dequantized to it per layer), batch {args.batch} x {args.seqlen} tokens, "
        f"{args.threads} thread(s), median of {args.steps} timed steps after a warm-up; each run its own process, "
        "order alternating.",
        "",
        f"Quantized Linears held in memory: {mem['quantized_layers']} layers, {mem['weights'] / 1e6:.1f} M weights in "
        f"{mem['bytes'] / mib:.1f} MiB = {mem['bits_per_weight']:.3f} bits/weight ({mem['ratio_bf16']:.3f} of their "
        f"bf16 size, {mem['bytes_bf16'] / mib:.1f} MiB; {mem['ratio_fp32']:.3f} of fp32). Whole model's parameters + "
        f"buffers after attach: {b[0]['model_bytes'] / mib:.0f} MiB (dense) vs {w[0]['model_bytes'] / mib:.0f} MiB "
        f"(4-bit; the tied 49152 x 576 embedding and the norms stay dense, in {args.dtype}).",
        "",
        table,
        "",
        f"Step time of the 4-bit base relative to the dense one (dequantization per forward and again in backward; no target "
        f"set): {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} pairs. Peak RSS includes the Python/torch "
        "runtime (several hundred MiB) and activations, so the saving shows as an absolute difference, not a ratio.",
    ]
    if fold:
        p, fa = fold["perplexity"], argparse.Namespace(**fold_blob["args"])
        lines += ["", f"Fine-tune then fold ({fold_blob['date']}): LoRA r=16 on the 4-bit base, fp32 compute, "
                  f"{fa.tune_steps} steps, lr {fa.lr}, batch {fa.batch} x {fa.seqlen} on the zoo's Wikipedia (held-out loss "
                  f"{fold['tune']['heldout_before']:.4f} -> {fold['tune']['heldout_after']:.4f}, "
                  f"{fold['tune_s']:.0f} s); perplexity on the held-out Wikipedia split, first {fa.eval_tokens} "
                  "tokens in 512-token windows:", "",
                  C.md_table(["model", "perplexity"], [[k, f"{v:.3f}"] for k, v in p.items()]), "",
                  "The dense fold is the adapter forward to rounding (its weights equal the fold into the "
                  "dequantized base bit for bit, tests/test_adapt_qbase.py). The RTN re-quantized fold fits "
                  "fresh scales to W + dW and re-rounds every changed group "
                  f"({100 * fold['folds']['folded + re-quantized (RTN W4 g64)']['changed_groups']:.1f}% of its "
                  "(row, group)s changed codes or scale); on the base's scales (`--requantize rtn-keep-scales`) "
                  "a code moves only where dW exceeds half a step "
                  + (f"({100 * fold['folds'][KEEP]['changed_groups']:.1f}% of the (row, group)s changed)"
                     if KEEP in fold["folds"] else "(not in this run)")
                  + ". Updates smaller than half a step are lost either way. Peak RSS of that child "
                  f"{fold['peak_rss_mib']:.0f} MiB."]
    lines += ["", "No anchor: PEFT's QLoRA runs on bitsandbytes' 4-bit layers, which need CUDA; this machine has "
              "none. Not QLoRA's NF4 data type, double quantization or paged optimizers: the base here is the int4 "
              "grid vLLM serves.", "", f"Reproduce: `{REPRO} --phase steps --seqlen {args.seqlen} --steps {args.steps}`"
              + (f" and `{REPRO} --phase fold --seqlen {fa.seqlen} --tune-steps {fa.tune_steps} --eval-tokens "
                 f"{fa.eval_tokens}`" if fold else "")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tune-steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", help="compute dtype of the step runs: float32 or bfloat16")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=C.cpu_count())
    ap.add_argument("--work", default=None, help="folder for the bases and outputs (default: the zoo cache)")
    ap.add_argument("--phase", choices=("both", "steps", "fold", "report"), default="both",
                    help="run one phase (its results are saved in --work) or only rebuild the section from the saved "
                         "results; the two phases may run at the same time")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from weightlab.zoo import cache_dir

    work = Path(args.work) if args.work else Path(cache_dir()) / "bench-qlora"
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = str(work)
    bf16, ct = prepare(work)
    saved = {k: work / f"{k}.json" for k in ("steps", "fold")}
    for phase, fn in (("steps", lambda: run_steps(args, bf16, ct)), ("fold", lambda: run_fold(args, bf16, ct, work))):
        if args.phase in ("both", phase):
            blob = {"args": {k: v for k, v in vars(args).items() if k not in ("phase", "no_write", "work_dir")},
                    "date": C.today(), "result": fn()}
            saved[phase].write_text(json.dumps(blob))
    if not saved["steps"].is_file():
        C.log("no step results saved yet: run --phase steps")
        return
    fold_blob = json.loads(saved["fold"].read_text()) if saved["fold"].is_file() else None
    body = report(json.loads(saved["steps"].read_text()), fold_blob)
    print(body)
    if not args.no_write:
        C.write_section(SECTION, body)
        C.log(f"wrote {C.RESULTS_MD}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        ap = argparse.ArgumentParser()
        ap.add_argument("x")
        ap.add_argument("mode")
        ap.add_argument("folder")
        for k in ("--batch", "--seqlen", "--steps", "--threads"):
            ap.add_argument(k, type=int)
        ap.add_argument("--dtype")
        a = ap.parse_args()
        print(json.dumps(child_step(a.mode, a.folder, a.batch, a.seqlen, a.steps, a.threads, a.dtype)))
    elif len(sys.argv) > 1 and sys.argv[1] == "_fold":
        ap = argparse.ArgumentParser()
        for k in ("x", "ct", "bf16", "work"):
            ap.add_argument(k)
        for k in ("--steps", "--batch", "--seqlen", "--eval-tokens", "--threads"):
            ap.add_argument(k, type=int)
        ap.add_argument("--lr", type=float)
        a = ap.parse_args()
        print(json.dumps(child_fold(a.ct, a.bf16, a.work, a.steps, a.batch, a.seqlen, a.lr, a.eval_tokens,
                                    a.threads)))
    else:
        main()
