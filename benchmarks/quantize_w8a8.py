"""W8A8 (SmoothQuant + int8, dynamic per-token activations) and FP8_DYNAMIC on SmolLM2-135M, weightlab vs
llm-compressor 0.14 in the same run; writes its own RESULTS.md section.

    .venv/bin/python benchmarks/quantize_w8a8.py               # 3 alternating pairs of W8A8, one of FP8_DYNAMIC
    .venv/bin/python benchmarks/quantize_w8a8.py --pairs 1 --no-write

Protocol (the quantize benchmark's SmolLM2 one): fp32 folder, calibration = the first 32 x 512 tokens of the zoo's
calibration split (consecutive windows, no special tokens), fed one window at a time to both tools (llm-compressor
batch_size=1; weightlab batches of 1, eager attention during calibration as llm-compressor); held-out perplexity over
16,384 tokens by weightlab.engine.evaluate.perplexity in both venvs, with the activations fake-quantized as each
tool's runtime does (llm-compressor: compressed-tensors' quantized forward after oneshot; weightlab:
compress.activations.fake_quant). weightlab: quantize(model, "smoothquant", 8, -1, sym=True, scale_dtype="float32",
activations="dynamic") (alpha 0.5, then RTN int8 per channel); llm-compressor: [SmoothQuantModifier(0.5),
QuantizationModifier(scheme="W8A8", ignore lm_head)]. FP8_DYNAMIC: quantize(model, "fp8", 8, -1,
activations="dynamic") vs QuantizationModifier(scheme="FP8_DYNAMIC") (data-free in both). Every run is a child
process; the timed phase is the quantize call (wall), pairs alternate which tool runs first.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _compress_common as CC  # noqa: E402

SECTION = "Quantize: W8A8 and FP8 on SmolLM2, weightlab vs llm-compressor"
PROTOCOL = (CC.NSAMPLES, CC.EVAL_TOKENS)  # calibration windows, held-out tokens
PPL_SLACK, TIME_TARGET = 1.01, 1.0  # weightlab PPL <= llm-compressor's x 1.01; quantize call no slower


def child_main(spec_path: str) -> int:
    t_start = time.perf_counter()
    spec, res = CC.child_setup(spec_path)
    res["scheme"] = spec["scheme"]
    CC.NSAMPLES, eval_tokens = spec["nsamples"], spec["eval_tokens"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tool, scheme = spec["tool"], spec["scheme"]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, local_files_only=True).eval()
    CC.materialize(model)
    ids = CC.load_ids(spec["ids_path"], (CC.NSAMPLES, CC.SEQLEN))
    res["calib_ids_sha"] = CC.sha(ids)
    text = Path(spec["eval_path"]).read_text(encoding="utf-8")
    ctx = None
    if tool == "llm-compressor" and scheme != "dense":
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        quant = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
        recipe = [SmoothQuantModifier(smoothing_strength=0.5), quant] if scheme == "W8A8" else [quant]
        with CC.Phase(res, "quant"):
            oneshot(model=model, tokenizer=tok, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), recipe=recipe,
                    num_calibration_samples=CC.NSAMPLES, max_seq_length=CC.SEQLEN, shuffle_calibration_samples=False,
                    batch_size=1)
    elif scheme != "dense":
        from weightlab.compress import quantize
        from weightlab.compress.activations import fake_quant
        from weightlab.registry import get_method

        get_method("compress", "smoothquant")  # imports every method family (untimed, as llm-compressor's imports)

        batches = [{"input_ids": ids[i:i + 1], "use_cache": False} for i in range(len(ids))]
        model.set_attn_implementation("eager")  # as llm-compressor calibrates
        method, params = ("smoothquant", {}) if scheme == "W8A8" else ("fp8", {"strategy": "channel"})
        with CC.Phase(res, "quant"):
            rep = quantize(model, method, 8, -1, sym=True, scale_dtype="float32", calib=batches, show_progress=False,
                           activations="dynamic", **params)
        model.set_attn_implementation("sdpa")
        ctx = fake_quant(model, rep.quantized, rep.act)
        res["transforms"] = len(rep.transforms)
    with CC.Phase(res, "eval"):
        if ctx is not None:
            with ctx:
                r = CC.eval_perplexity(model, tok, text, max_tokens=eval_tokens)
        else:
            r = CC.eval_perplexity(model, tok, text, max_tokens=eval_tokens)
    res["quality"] = {"ppl": r["perplexity"], "tokens": r["tokens"], "eval_ids_sha": r["eval_ids_sha"]}
    return CC.child_finish(res, Path(spec["out_dir"]), spec["tag"], t_start)


def plan(pairs: int, skip_lc: bool) -> list[dict]:
    runs = [{"tool": "weightlab", "scheme": "dense", "method": "dense", "tag": "dense"}]
    tools = ["weightlab"] if skip_lc else ["weightlab", "llm-compressor"]
    for scheme, n in (("W8A8", pairs), ("FP8_DYNAMIC", 1)):
        for i in range(n):
            order = tools if i % 2 == 0 else tools[::-1]
            runs += [{"tool": t, "scheme": scheme, "method": scheme, "tag": f"{scheme}_{t}_{i}"} for t in order]
    return runs


def render(results: list[dict], total_s: float, note: str, nsamples: int = CC.NSAMPLES,
           eval_tokens: int = CC.EVAL_TOKENS, flags: str = "") -> str:
    r0 = results[0]
    lo, hi = CC.loadavg_range(results)
    v = r0["versions"]
    lines = [f"Run {C.today()} on {C.machine_line()}; {C.load_sentence([lo, hi])} Total {total_s / 60:.1f} min"
             + (f" ({note})" if note else "") + ".",
             f"weightlab torch {v['torch']}, transformers {v['transformers']}; llm-compressor's venv: "
             + ", ".join(f"{k} {x}" for k, x in next((r["versions"] for r in results
                                                       if r["tool"] == "llm-compressor"), {}).items()) + ".",
             f"SmolLM2-135M fp32, {nsamples} x {CC.SEQLEN} calibration tokens (one window per batch in both tools), "
             f"held-out PPL over {eval_tokens:,} tokens with the activations fake-quantized as each tool's runtime "
             "does (weightlab's perplexity code in both venvs). W8A8 = SmoothQuant alpha 0.5 + int8 per-channel "
             "weights + dynamic per-token int8 "
             "inputs; FP8_DYNAMIC = fp8 e4m3 per-channel weights + dynamic per-token fp8 inputs. Time = the quantize "
             "call (wall), each run its own process, pairs alternating which tool runs first.", ""]
    rows, verdicts = [], []
    dense = next((r for r in results if r["scheme"] == "dense"), None)
    if dense:
        rows.append(["fp32 (dense)", "-", f"{dense['quality']['ppl']:.3f}", "-", "-", "-"])
    for scheme in ("W8A8", "FP8_DYNAMIC"):
        pairs = {}
        for r in results:
            if r["scheme"] == scheme:
                pairs.setdefault(r["tag"].rsplit("_", 1)[1], {})[r["tool"]] = r
        for i, p in sorted(pairs.items()):
            for tool, r in p.items():
                rows.append([scheme, tool, f"{r['quality']['ppl']:.3f}", f"{r['quant_s']:.1f}",
                             f"{r['quant_cpu_s']:.1f}", f"{r['peak_rss_mib']:.0f}"])
        full = [p for p in pairs.values() if len(p) == 2]
        if not full:
            continue
        ratios = [p["weightlab"]["quant_s"] / p["llm-compressor"]["quant_s"] for p in full]
        a = [p["weightlab"]["quality"]["ppl"] for p in full]
        b = [p["llm-compressor"]["quality"]["ppl"] for p in full]
        ok = max(a) <= min(b) * PPL_SLACK
        verdicts.append(f"- {scheme} PPL: weightlab {min(a):.3f}-{max(a):.3f} vs llm-compressor {min(b):.3f}-"
                        f"{max(b):.3f} (target <= x {PPL_SLACK}): **{'met' if ok else 'NOT met'}**")
        cpu = [p["weightlab"]["quant_cpu_s"] / p["llm-compressor"]["quant_cpu_s"] for p in full]
        verdicts.append(f"- {scheme} time (weightlab / llm-compressor, quantize call, wall): "
                        f"{C.ratio_verdict(ratios, TIME_TARGET)}; CPU-second ratios (less load-bound, not the "
                        f"target): {', '.join(f'{x:.2f}' for x in cpu)}")
    lines.append(C.md_table(["scheme", "tool", "PPL", "quantize s", "quantize CPU s", "peak RSS MiB"], rows))
    lines += ["", "Verdicts (targets: PPL <= llm-compressor's x 1.01; time ratio <= 1.0 on >= 3 alternating pairs):"]
    lines += verdicts
    lines += ["", "FP8_DYNAMIC is data-free in both tools; weightlab's call (about a CPU second, profiled) also "
              "computes "
              "its per-layer report (float64 squared norms and relative errors, exact-zero counts) and writes the "
              "dequantized weights back into the model.",
              "", "Bit-level parity on a 2-block Llama (tests/test_w8a8_parity.py): SmoothQuant's smoothed norms, the "
              "int8/fp8 codes, weight, input and k/v scales equal llm-compressor's bit for bit (W8A8 dynamic and "
              "static, FP8, FP8_DYNAMIC + FP8 KV cache).", "",
              f"Reproduce: `.venv/bin/python benchmarks/quantize_w8a8.py{flags}` (llm-compressor venv: "
              f"`{CC.LC_SETUP}`)."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternating W8A8 pairs (the timing rule needs 3)")
    ap.add_argument("--skip-lc", action="store_true")
    ap.add_argument("--lc-python")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep")
    ap.add_argument("--windows", type=int, default=CC.NSAMPLES,
                    help=f"calibration windows of {CC.SEQLEN} tokens (protocol: {CC.NSAMPLES}; fewer = a reduced run, "
                         "labelled so in the section)")
    ap.add_argument("--eval-tokens", type=int, default=CC.EVAL_TOKENS,
                    help=f"held-out tokens scored (protocol: {CC.EVAL_TOKENS})")
    CC.add_threads_arg(ap)
    args = ap.parse_args(argv)
    runs = plan(args.pairs, args.skip_lc)
    reduced = (args.windows, args.eval_tokens) != PROTOCOL
    CC.NSAMPLES = args.windows  # prepare_smollm2 cuts this many windows
    lc_py = None if args.skip_lc else CC.lc_python(args.lc_python)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="wl-w8a8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    d = CC.prepare_smollm2(work)
    data = {"model_dir": d["model_dir"], "ids_path": d["ids_path"], "eval_path": d["heldout_path"],
            "nsamples": args.windows, "eval_tokens": args.eval_tokens}
    C.warm_page_cache([d["model_dir"]])
    results = []
    for r in runs:
        C.log(f"{r['tag']} ...")
        res, cr = CC.run_child(__file__, {**r, **data}, work,
                               C.python_exe() if r["tool"] == "weightlab" else lc_py, args.threads)
        results.append(res)
        C.log(f"  wall {cr.wall_s:.1f}s, quant {res.get('quant_s', 0):.1f}s, PPL {res['quality']['ppl']:.3f}")
    note = (f"{args.pairs} W8A8 pair(s)" + (", --skip-lc" if args.skip_lc else "")
            + (f", --threads {args.threads} in every child" if args.threads else "")
            + (f"; REDUCED protocol: {args.windows} calibration windows and {args.eval_tokens:,} held-out tokens "
               f"instead of the protocol's {PROTOCOL[0]} and {PROTOCOL[1]:,}" if reduced else ""))
    defaults = {"pairs": 3, "windows": PROTOCOL[0], "eval_tokens": PROTOCOL[1], "threads": None}
    flags = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, d in defaults.items()
                    if getattr(args, k) not in (d, None))  # the Reproduce line names what differs from the protocol
    body = render(results, time.perf_counter() - t_all, note, args.windows, args.eval_tokens, flags)
    return CC.publish(body, work, SECTION, not args.no_write and not CC.SMOKE and not args.skip_lc, args.keep)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
