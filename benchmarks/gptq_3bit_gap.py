"""Where does the GPTQ 3-bit perplexity gap to llm-compressor on SmolLM2 come from? (issue 22)

The quantize benchmark once measured W3 g64 GPTQ perplexity 76.3 (weightlab) vs 67.3 (llm-compressor) with
no cause found. This script takes both pipelines apart on the quantize benchmark's data (SmolLM2-135M fp32,
32 x 512 consecutive calibration windows, symmetric int3, groups of 64, static act-order, damping 0.01,
lazy blocks of 128, eager attention during calibration):

1. ``capture-lc DIR`` (run with .venv-lc): llm-compressor 0.14's oneshot(GPTQModifier), recording every
   ``quantize_weight`` call: the weight, the normalized Hessian, the observer scales and the quantized weight.
2. ``capture-wl DIR`` (.venv): weightlab's ``quantize(model, "gptq", 3, 64, act_order, static_groups)``,
   recording each layer's weight, Hessian and dequantized result.
3. ``analyze DIR`` (.venv): per layer, (a) how far the two tools' Hessians are apart, (b) weightlab's solver
   (tensor/gptq.py) run on llm-compressor's own weight and Hessian in float32 and float64 against
   llm-compressor's result (loss 1/2 tr((W-Q) H (W-Q)^T)), and the held-out perplexity (16,384 tokens, the
   benchmark's evaluation) of: llm-compressor's weights, weightlab's weights, and weightlab's solver on
   llm-compressor's Hessians in float32 and float64.

    .venv/bin/python benchmarks/gptq_3bit_gap.py              # all three phases (about 1 h on 2 busy cores)
    .venv/bin/python benchmarks/gptq_3bit_gap.py --dir D --render-only
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
SECTION = "Fidelity: GPTQ 3-bit on SmolLM2, weightlab vs llm-compressor"
ROOT = Path(__file__).resolve().parents[1]
BITS, GROUP, NSAMPLES = 3, 64, 32


def _model_dir() -> str:
    from weightlab.zoo import smollm2

    return str(smollm2())


def capture_lc(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import llmcompressor.modifiers.gptq.base as B
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    out = d / "lc"
    out.mkdir(exist_ok=True)
    calls, names = [], []
    orig_qw, orig_up = B.quantize_weight, B.update_batch_qparams

    def qw(**kw):  # the weights tensor is the solver's scratch buffer: copy it first
        w0, h = kw["weights"].clone(), kw["hessians"].clone()
        q, losses, fb = orig_qw(**kw)
        calls.append({"W": w0, "H": h, "scale": kw["scale"].clone(), "Q": q.clone()})
        return q, losses, fb

    def up(batch, *a, **k):
        names.append([mod_names[m] for m in batch])
        return orig_up(batch, *a, **k)

    B.quantize_weight, B.update_batch_qparams = qw, up
    md = json.loads((d / "data.json").read_text())["model_dir"]
    tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, local_files_only=True).eval()
    mod_names = {m: n for n, m in model.named_modules()}
    ids = torch.load(d / "calib_ids.pt", weights_only=True)[:NSAMPLES]
    grid = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
    quant = {"config_groups": {"g0": {"targets": ["Linear"], "weights": grid}}, "ignore": ["re:.*lm_head"]}
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
            recipe=GPTQModifier(**quant), num_calibration_samples=NSAMPLES, max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, batch_size=1)
    for c, nm in zip(calls, names):
        for i, name in enumerate(nm):
            save_file({k: c[k][i].contiguous() for k in ("W", "H", "scale", "Q")}, str(out / f"{name}.safetensors"))
    (out / "run.json").write_text(json.dumps({"seconds": time.perf_counter() - t, "layers": sum(map(len, names))}))


def capture_wl(d: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import weightlab.compress.gptq as G
    from weightlab.compress import quantize
    from weightlab.registry import get_method

    torch.set_num_threads(1)
    out = d / "wl"
    out.mkdir(exist_ok=True)
    orig_solve, orig_rule, last = G.gptq_solve, G.gptq, {}

    def solve(W, H, *a, **k):  # H is factored in place: copy it first
        last["W"], last["H"] = W.detach().float().clone(), H.detach().float().clone()
        return orig_solve(W, H, *a, **k)

    def rule(ctx):
        q = orig_rule(ctx)
        save_file({"W": last["W"], "H": last["H"], "Q": q.dequantize().float().contiguous()},
                  str(out / f"{ctx.name}.safetensors"))
        return q

    G.gptq_solve = solve
    object.__setattr__(get_method("compress", "gptq"), "fn", rule)
    md = json.loads((d / "data.json").read_text())["model_dir"]
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, local_files_only=True).eval()
    model.set_attn_implementation("eager")  # as llm-compressor calibrates
    ids = torch.load(d / "calib_ids.pt", weights_only=True)[:NSAMPLES]
    batches = [{"input_ids": b, "use_cache": False} for b in ids.split(4)]
    t = time.perf_counter()
    quantize(model, "gptq", BITS, GROUP, sym=True, calib=batches, show_progress=False, act_order=True,
             static_groups=True)
    (out / "run.json").write_text(json.dumps({"seconds": time.perf_counter() - t}))


def _qloss(W, Q, H) -> float:
    import torch

    D = (W - Q).double()
    return 0.5 * float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def analyze(d: Path, blocks: set[int] | None, ppl_keys: tuple[str, ...]) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import _compress_common as CC
    from weightlab.tensor.gptq import gptq

    torch.set_num_threads(C_threads())
    md = json.loads((d / "data.json").read_text())["model_dir"]
    files = sorted((d / "lc").glob("model.*.safetensors"), key=lambda p: (int(p.stem.split(".")[2]), p.stem))
    h_rel = {f.stem: _h_rel(f, d / "wl" / f.name) for f in files}  # every layer: cheap
    if blocks is not None:
        files = [f for f in files if int(f.stem.split(".")[2]) in blocks]
    layers, solved = [], {"h32": {}, "h64": {}}
    for f in files:
        a, b = load_file(str(f)), load_file(str(d / "wl" / f.name))
        W, H, Qlc = a["W"], a["H"], a["Q"]
        row = {"name": f.stem, "h_rel": h_rel[f.stem],
               "loss_lc": _qloss(W, Qlc, H), "loss_wl_pipeline": _qloss(b["W"], b["Q"], b["H"])}
        for key, dt in (("h32", torch.float32), ("h64", torch.float64)):
            q, _ = gptq(W, H, BITS, GROUP, True, True, True, 128, 0.01, "float32", dt)
            Q = q.dequantize().float()
            solved[key][f.stem] = Q
            row[f"loss_{key}"] = _qloss(W, Q, H)
            row[f"codes_differ_{key}"] = float((Q != Qlc).float().mean())
        layers.append(row)
        print(f"{f.stem}: H rel {row['h_rel']:.1e}, loss lc {row['loss_lc']:.1f} wl32 {row['loss_h32']:.1f} "
              f"wl64 {row['loss_h64']:.1f}", flush=True)
    tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
    text = (d / "heldout.txt").read_text(encoding="utf-8")
    ppl = {}
    for key in ppl_keys:
        if key in solved and len(solved[key]) < len(h_rel):
            continue  # solved on a subset of the blocks only
        model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, local_files_only=True).eval()
        for n, mod in model.named_modules():
            if n.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                src = solved[key][n] if key in solved else load_file(str(d / key / f"{n}.safetensors"))["Q"]
                mod.weight.data.copy_(src)
        ppl[key] = CC.eval_perplexity(model, tok, text)["perplexity"]
        print(f"perplexity {key}: {ppl[key]:.3f}", flush=True)
    (d / "analysis.json").write_text(json.dumps({"layers": layers, "h_rel": h_rel, "ppl": ppl,
                                                 "date": time.strftime("%Y-%m-%d")}))


def _h_rel(a: Path, b: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ha, hb = fa.get_tensor("H"), fb.get_tensor("H")
    return float((hb - ha).norm() / ha.norm())


def C_threads() -> int:
    import _common as C

    return C.cpu_count()


def render(d: Path) -> str:
    import _common as C

    r = json.loads((d / "analysis.json").read_text())
    L, ppl = r["layers"], r["ppl"]
    first = [x for x in L if x["name"].startswith("model.layers.0.")]
    rel32 = [abs(x["loss_h32"] - x["loss_lc"]) / x["loss_lc"] for x in L]
    gain64 = [x["loss_h64"] / x["loss_lc"] for x in L]
    worst = max(L, key=lambda x: x["loss_lc"] / max(x["loss_h64"], 1e-12))
    depth = {}
    for name, v in r["h_rel"].items():
        depth.setdefault(int(name.split(".")[2]), []).append(v)
    blocks = sorted({int(x["name"].split(".")[2]) for x in L})
    tot = {k: sum(x[k] for x in L) for k in ("loss_lc", "loss_h32", "loss_h64", "loss_wl_pipeline")}
    label = {"lc": ("llm-compressor 0.14 (its own pipeline and solver)", "loss_lc"),
             "wl": ("weightlab (its own pipeline, float64 solver)", "loss_wl_pipeline"),
             "h32": ("weightlab's solver, float32, on llm-compressor's Hessians", "loss_h32"),
             "h64": ("weightlab's solver, float64, on llm-compressor's Hessians", "loss_h64")}
    rows = [[label[k][0], f"{ppl[k]:.3f}" if k in ppl else "not run", f"{tot[label[k][1]]:,.0f}"] for k in label]
    body = [
        f"Date: {r['date']}. Machine: {C.machine_line()}; busy (other jobs ran at the same time; no timings are "
        "compared here). Reproduce: `.venv/bin/python benchmarks/gptq_3bit_gap.py` (three phases, each its own "
        "process; llm-compressor 0.14.0.1 in .venv-lc).",
        "",
        "Claim under test (issue 22): the quantize benchmark's W3 g64 GPTQ perplexity on SmolLM2-135M was 76.3 for "
        "weightlab vs 67.3 for llm-compressor, cause unknown. Setting: the quantize benchmark's data (32 x 512 "
        "calibration tokens, 16,384 held-out tokens), symmetric int3, groups of 64, static act-order, damping 0.01, "
        "blocks of 128, eager attention while calibrating, both tools' every layer recorded.",
        "",
        C.md_table(["weights", "held-out PPL", f"sum of 1/2 tr((W-Q)H(W-Q)^T) over the {len(L)} layers of blocks "
                   + ", ".join(map(str, blocks))], rows),
        "",
        f"- Same algorithm: on llm-compressor's own W and H, weightlab's solver in float32 reproduces llm-compressor's "
        f"layer loss to {max(rel32):.1e} relative on every layer compared (median {statistics.median(rel32):.1e}).",
        f"- Same statistics: the first block's Hessians of the two tools agree to "
        f"{max(x['h_rel'] for x in first):.1e} (float32 accumulation order).",
        f"- Float64 vs float32 solver on the same H: loss ratio median {statistics.median(gain64):.4f}, best "
        f"{min(gain64):.3f} ({worst['name']}: {worst['loss_lc']:,.0f} -> {worst['loss_h64']:,.0f}); float64 is never "
        f"worse than float32 by more than {100 * (max(gain64) - 1):.1f} %.",
        "- The pipelines then drift apart: relative distance of the two tools' Hessians by block "
        + ", ".join(f"{k}: {statistics.median(v):.1e}" for k, v in sorted(depth.items()) if k in (0, 1, 2, 5, 10, 20, 29))
        + " (median over the block's 7 layers)"
        + ". At 3 bits a rounding-level difference in one block changes many codes in the next.",
        "",
        f"Verdict: no defect found. The algorithms are the same to float32 rounding, and in this run weightlab's "
        f"perplexity is {'lower' if ppl['wl'] < ppl['lc'] else 'higher'} than llm-compressor's ({ppl['wl']:.2f} vs "
        f"{ppl['lc']:.2f}). llm-compressor's 67.3 of the earlier run did not reproduce with the same version, data, "
        "settings and thread count (only the machine changed), nor did weightlab's 76.3. At 3 bits the result moves "
        "by more than the earlier gap between runs that change nothing in either method, and solving in float64 "
        "instead of float32 changes single outlier layers' loss by up to the factor shown above; a single 3-bit "
        "perplexity difference on this model, without repeats, says nothing about either tool.",
    ]
    return "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", nargs="?", choices=("all", "capture-lc", "capture-wl", "analyze"), default="all")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (kept); default: a new one under /tmp")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--blocks", default="0,1,11,28,29",
                    help="blocks whose layers are re-solved (all: every block; the Hessian distances cover all)")
    ap.add_argument("--ppl", default="lc,wl", help="perplexities to measure: lc, wl, and (with --blocks all) h32, h64")
    args = ap.parse_args(argv)
    d = args.dir or Path(f"/tmp/weightlab-gptq3-{int(time.time())}")
    d.mkdir(parents=True, exist_ok=True)
    if args.phase == "capture-lc":
        capture_lc(d)
        return 0
    if args.phase == "capture-wl":
        capture_wl(d)
        return 0
    blocks = None if args.blocks == "all" else {int(b) for b in args.blocks.split(",")}
    if args.phase == "analyze":
        analyze(d, blocks, tuple(k.strip() for k in args.ppl.split(",") if k.strip()))
        return 0
    if not args.render_only:
        import _compress_common as CC

        data = CC.prepare_smollm2(d)
        (d / "data.json").write_text(json.dumps(data))
        lc_py = ROOT / ".venv-lc" / "bin" / "python"
        env_path = {"PYTHONPATH": str(ROOT / "src")}
        import os

        for exe, phase in ((str(lc_py), "capture-lc"), (sys.executable, "capture-wl"), (sys.executable, "analyze")):
            extra = ["--blocks", args.blocks, "--ppl", args.ppl] if phase == "analyze" else []
            rc = subprocess.call([exe, __file__, phase, "--dir", str(d), *extra], env={**os.environ, **env_path})
            if rc:
                raise SystemExit(f"phase {phase} failed (exit {rc}); work folder {d}")
    text = render(d)
    print(text)
    if not args.no_write:
        import _common as C

        C.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
