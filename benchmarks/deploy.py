"""Deployment outputs of weightlab and llm-compressor on SmolLM2-135M: size on disk, load time in transformers, perplexity.

    .venv/bin/python benchmarks/deploy.py                   # everything (issue 17's proof), updates RESULTS.md
    .venv/bin/python benchmarks/deploy.py --only gptq       # GPTQ W4 g64 only (both tools) + the dense baseline
    .venv/bin/python benchmarks/deploy.py --only 24,gguf --skip-lc --no-write
    .venv/bin/python benchmarks/deploy.py --smoke           # a tiny protocol to test the script; never written

llm-compressor lives in its own venv (.venv-lc; see _compress_common.LC_SETUP). Protocol (SmolLM2, the prune and
quantize benchmarks' data: 32 x 512 calibration tokens, consecutive windows of the zoo's calibration split, the very
same id tensor handed to both tools; held-out perplexity over 16,384 tokens in 512-token windows):
  gptq: GPTQ 4-bit, groups of 64, symmetric, no act-order, every Linear of the 30 blocks (lm_head is tied/ignored),
        written as compressed-tensors pack-quantized (W4A16 g64).
        weightlab = run_sequential('quantize', ..., calib=ids, method='gptq', bits=4, group_size=64, sym=True,
        **sequential_writer(ck)) (what `weightlab quantize zoo:smollm2 -m gptq -b 4 -g 64` runs, but with the
        benchmark's ids instead of the CLI's seeded random windows);
        llm-compressor = oneshot(GPTQModifier(W4 sym group 64, actorder=None, ignore lm_head)) then
        model.save_pretrained(out, save_compressed=True).
  24:   SparseGPT 2:4 then GPTQ W4 g64 sym. weightlab: `prune -m sparsegpt --pattern 2:4 --format hf` (dense folder,
        same ids, run_sequential('prune', ...)) then the GPTQ step above on that folder (same ids);
        llm-compressor: one oneshot with [SparseGPTModifier(0.5, '2:4'), GPTQModifier(...)].
  gguf: weightlab's GGUF export of the dense model (q8_0, q4_0, q4_k_m; no llama.cpp binary needed).
Every output (and the dense source) is then loaded in fresh children of the weightlab venv (one transformers for
both tools): `AutoModelForCausalLM.from_pretrained(folder)` (GGUF: `gguf_file=`), timed, repeats alternating the
order; the first repeat also scores perplexity with weightlab.engine.evaluate.perplexity (the same code for all).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before _compress_common reads it; the children inherit it through their environment
    os.environ["WL_COMPRESS_BENCH_SMOKE"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _compress_common as CC  # noqa: E402
from _compress_common import LC_SETUP, SMOKE, fmt  # noqa: E402

SECTION = "Deploy: compressed-tensors and GGUF outputs of weightlab vs llm-compressor (SmolLM2-135M)"
REPRO = ".venv/bin/python benchmarks/deploy.py"
BITS, GROUP = 4, 64
GGUF_TYPES = ("q8_0", "q4_0", "q4_k_m")
PPL_SLACK, SIZE_SLACK, LOAD_SLACK = 1.01, 1.01, 1.10  # weightlab vs llm-compressor targets (see the verdicts)
OUTPUTS = {  # tag: (group, tool, scheme)
    "dense": (None, "source", "fp32 safetensors (the zoo folder)"),
    "wl_gptq": ("gptq", "weightlab", f"GPTQ W{BITS} g{GROUP} sym, compressed-tensors"),
    "lc_gptq": ("gptq", "llm-compressor", f"GPTQ W{BITS} g{GROUP} sym, compressed-tensors"),
    "wl_24": ("24", "weightlab", f"SparseGPT 2:4 + GPTQ W{BITS} g{GROUP}, compressed-tensors"),
    "lc_24": ("24", "llm-compressor", f"SparseGPT 2:4 + GPTQ W{BITS} g{GROUP}, compressed-tensors"),
    **{f"gguf_{t}": ("gguf", "weightlab", f"GGUF {t.upper()}") for t in GGUF_TYPES},
}


# ============================================================================ children (stdlib at top level only)

def child_main(spec_path: str) -> int:
    t_start = time.perf_counter()
    spec, res = CC.child_setup(spec_path)
    res.update({k: spec[k] for k in ("tag", "mode", "output")})
    if spec["mode"] == "make":
        _make(spec, res, t_start)
    else:
        _load(spec, res, t_start)
    return CC.child_finish(res, Path(spec["out_dir"]), spec["tag"], t_start)


def _make(spec: dict, res: dict, t_start: float) -> None:
    """Write one output (a compressed-tensors folder or a GGUF file) with one tool."""
    import torch

    out, tag, mp = Path(spec["path"]), spec["output"], spec["model_dir"]
    group = OUTPUTS[tag][0]
    if tag.startswith("gguf_"):
        from weightlab.io.gguf_export import export_gguf

        res["import_s"] = time.perf_counter() - t_start
        with CC.Phase(res, "make"):
            rep = export_gguf(mp, out, tag.removeprefix("gguf_"), force=True)
        res["export"] = rep.as_dict()
        return
    ids = CC.load_ids(spec["ids_path"], (CC.NSAMPLES, CC.SEQLEN))
    res["calib_ids_sha"] = CC.sha(ids)
    if spec["tool"] == "weightlab":
        from transformers import AutoTokenizer

        from weightlab.compress.cards import sparsity_card
        from weightlab.compress.deploy_sequential import sequential_writer
        from weightlab.compress.sequential import run_sequential
        from weightlab.io.provenance import Provenance
        from weightlab.io.reader import open_checkpoint

        res["import_s"] = time.perf_counter() - t_start
        tok = AutoTokenizer.from_pretrained(mp, local_files_only=True)
        common = dict(calib=ids, nsamples=CC.NSAMPLES, seqlen=CC.SEQLEN, tokenizer=tok, force=True, show_progress=False)
        src = mp
        with CC.Phase(res, "make"):
            if group == "24":  # `weightlab prune SRC -m sparsegpt --pattern 2:4 --format hf` with the benchmark's ids
                pruned = out.parent / f"{out.name}-pruned-hf"
                kw = dict(method="sparsegpt", sparsity=0.5, pattern="2:4")
                prov = Provenance(method="compress/prune/sparsegpt", params=kw, inputs=[str(src)],
                                  card=sparsity_card(0.5, "2:4"))
                t0 = time.perf_counter()
                prep, _ = run_sequential("prune", src, pruned, provenance=prov, **common, **kw)
                res["prune_s"] = time.perf_counter() - t0
                res["prune_sparsity"] = prep.sparsity
                src = str(pruned)
            # `weightlab quantize SRC -m gptq -b 4 -g 64` (format compressed-tensors, symmetric): the CLI's own calls
            with open_checkpoint(src) as ck:
                dt = str(ck.info(next(n for n in ck.names() if ".layers." in n and n.endswith("proj.weight"))).dtype)
                scale_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(dt.removeprefix("torch."), "float16")
                kw = dict(method="gptq", bits=BITS, group_size=GROUP, sym=True, scale_dtype=scale_dtype)
                prov = Provenance(method="compress/quantize/gptq", params=kw, inputs=[str(src)])
                t0 = time.perf_counter()
                qrep, _ = run_sequential("quantize", src, out, provenance=prov, **common, **kw,
                                         **sequential_writer(ck))
                res["quant_s"] = time.perf_counter() - t0
        res["scale_dtype"] = scale_dtype
        res["layers"] = len(qrep.layers)
        return
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res["import_s"] = time.perf_counter() - t_start
    tok = AutoTokenizer.from_pretrained(mp, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(mp, dtype=torch.float32, local_files_only=True).eval()
    grid = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
    recipe = [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": grid}},
                           ignore=["lm_head"], actorder=None)]
    if group == "24":
        recipe.insert(0, SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]))
    ds = Dataset.from_dict({"input_ids": ids.tolist()})
    with CC.Phase(res, "make"):
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=CC.NSAMPLES,
                max_seq_length=CC.SEQLEN, shuffle_calibration_samples=False, batch_size=1)
        t0 = time.perf_counter()
        model.save_pretrained(str(out), save_compressed=True)
        tok.save_pretrained(str(out))
        res["save_s"] = time.perf_counter() - t0


def _load(spec: dict, res: dict, t_start: float) -> None:
    """Time from_pretrained of one output in the weightlab venv; on the first repeat also score it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res["import_s"] = time.perf_counter() - t_start
    path = Path(spec["path"])
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if kw else path
    with CC.Phase(res, "load"):
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kw).eval()
    res["model_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)  # one tokenizer for every output
    x = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with CC.Phase(res, "first_forward"), torch.no_grad():  # compressed-tensors decompresses on the first forward
        model(input_ids=x)
    if not spec.get("eval"):
        return
    text = Path(spec["heldout_path"]).read_text(encoding="utf-8")
    with CC.Phase(res, "eval"):
        r = CC.eval_perplexity(model, tok, text)
    res["quality"] = {"ppl": r["perplexity"], "tokens": r["tokens"], "eval_ids_sha": r["eval_ids_sha"]}
    if spec.get("check24"):
        res["check"] = _check_24(model)


def _check_24(model) -> dict:
    """Zeros in the block Linears as loaded: the share of 4-column groups that still hold >= 2 zeros."""
    import torch

    ok = groups = zeros = total = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            w = m.weight.detach()
            z = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
            ok += int((z >= 2).sum())
            groups += z.numel()
            zeros += int((w == 0).sum())
            total += w.numel()
    return {"share_24_groups": ok / max(groups, 1), "sparsity": zeros / max(total, 1)}


# ============================================================================ driver: what is on disk

def _st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n)), 8 + n


def disk_stats(path: Path) -> dict:
    """Bytes on disk and bits per weight of the block Linears, from the safetensors headers / the GGUF tensor infos."""
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        rd = GGUFReader(str(path))
        nbytes = numel = 0
        for t in rd.tensors:
            if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2:
                nbytes += int(t.n_bytes)
                numel += int(t.n_elements)
        types = {}
        for t in rd.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        return {"bytes": path.stat().st_size, "linear_bpw": 8 * nbytes / numel, "tensor_types": types}
    files = sorted(path.glob("*.safetensors"))
    nbytes = numel = 0
    for f in files:
        hdr, start = _st_header(f)
        hdr.pop("__metadata__", None)
        for name, info in hdr.items():
            if ".layers." not in name:
                continue
            a, b = info["data_offsets"]
            if name.endswith(".weight_shape"):  # the logical [out, in] of a packed layer
                with open(f, "rb") as fh:
                    fh.seek(start + a)
                    o, i = struct.unpack("<qq", fh.read(16))
                numel += o * i
                nbytes += b - a
            elif name.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"):
                nbytes += b - a
            elif name.endswith(".weight") and len(info["shape"]) == 2:  # a dense Linear
                numel += info["shape"][0] * info["shape"][1]
                nbytes += b - a
    out = {"bytes": sum(f.stat().st_size for f in files), "linear_bpw": 8 * nbytes / numel if numel else None}
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc:
        out["ct"] = {"format": qc.get("format"), "status": qc.get("quantization_status"),
                     "weights": [g.get("weights") for g in qc.get("config_groups", {}).values()],
                     "ignore": qc.get("ignore")}
    return out


# ============================================================================ driver

def plan(args) -> list[str]:
    groups = args.only.split(",") if args.only else ["gptq", "24", "gguf"]
    bad = [g for g in groups if g not in ("gptq", "24", "gguf")]
    if bad:
        sys.exit(f"--only takes gptq, 24, gguf; got {', '.join(bad)}")
    tags = ["dense"] + [t for t, (g, tool, _) in OUTPUTS.items() if g in groups
                        and not (args.skip_lc and tool == "llm-compressor")]
    return tags


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny protocol (4 calibration samples, 2,048 eval tokens, "
                    "one repeat) to test the script; never written to RESULTS.md")
    ap.add_argument("--repeats", type=int, default=None, help="load-time repeats per output (default 3; smoke 1)")
    ap.add_argument("--only", help="comma-separated groups: gptq, 24, gguf (the dense baseline always runs)")
    ap.add_argument("--skip-lc", action="store_true", help="weightlab only")
    ap.add_argument("--lc-python", help="python of the llm-compressor venv (default .venv-lc/bin/python)")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even for a partial run")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--keep", help="keep the work folder (outputs, per-run JSON) at this path")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: reuse outputs that an earlier run left in that folder (resume); loads rerun")
    ap.add_argument("--render-only", metavar="DIR", help="re-render the section from a kept work folder")
    CC.add_threads_arg(ap)
    args = ap.parse_args(argv)
    if args.render_only:
        work = Path(args.render_only)
        st = json.loads((work / "state.json").read_text())
        results = [json.loads(p.read_text()) for p in work.glob("result_*.json")]
        body = render(results, st["disk"], st["data"], st["total_s"], st["note"])
        print(body)
        if not args.no_write and not SMOKE:
            C.write_section(SECTION, body)
        return 0
    repeats = args.repeats or (1 if SMOKE else 3)
    tags = plan(args)
    if args.reuse and not args.keep:
        sys.exit("--reuse needs --keep DIR (the folder of the earlier run)")
    lc_py = CC.lc_python(args.lc_python) if any(OUTPUTS[t][1] == "llm-compressor" for t in tags) else None
    partial = bool(args.only or args.skip_lc or (args.repeats and args.repeats < 3))
    write = not args.no_write and (args.write or not partial) and not SMOKE
    t_all = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="wl-deploy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    outs = work / "outputs"
    outs.mkdir(exist_ok=True)
    C.log(f"work folder {work}; outputs: {', '.join(tags)}; {repeats} load repeat(s)" + (" (SMOKE)" if SMOKE else ""))
    data = CC.prepare_smollm2(work)
    C.warm_page_cache([data["model_dir"]])
    paths = {"dense": Path(data["model_dir"])}
    for t in tags[1:]:
        paths[t] = outs / t / f"smollm2-{t.removeprefix('gguf_').replace('_', '-')}.gguf" if t.startswith("gguf_") \
            else outs / t
    results = []

    def child(tag: str, output: str, mode: str, **extra) -> dict:
        tool = OUTPUTS[output][1] if mode == "make" else "weightlab"
        spec = {"tag": tag, "output": output, "mode": mode, "tool": tool, "path": str(paths[output]),
                "model_dir": data["model_dir"], "ids_path": data["ids_path"], "heldout_path": data["heldout_path"],
                **extra}
        res, cr = CC.run_child(__file__, spec, work, lc_py if tool == "llm-compressor" else C.python_exe(),
                               args.threads)
        res["order"] = len(results)
        (work / f"result_{tag}.json").write_text(json.dumps(res, indent=1))
        results.append(res)
        return res

    # 1. write every output; pairs alternate which tool goes first
    flip = False
    for g in ("gptq", "24", "gguf"):
        group = [t for t in tags if OUTPUTS[t][0] == g]
        if g != "gguf" and flip:
            group = group[::-1]
        flip = not flip if g != "gguf" else flip
        for t in group:
            if t.startswith("gguf_"):
                paths[t].parent.mkdir(parents=True, exist_ok=True)
            kept = work / f"result_make_{t}.json"
            if args.reuse and kept.exists() and paths[t].exists():  # resume a kept run: the output is already there
                r = json.loads(kept.read_text())
                r["order"] = len(results)
                results.append(r)
                C.log(f"make {t}: reused from {kept}")
                continue
            C.log(f"make {t} ...")
            r = child(f"make_{t}", t, "make")
            C.log(f"  {r['make_s']:.1f} s (cpu {r['make_cpu_s']:.1f} s), wall {r['wall_s']:.1f} s, "
                  f"peak {r['peak_rss_mib']:.0f} MiB")
    disk = {t: disk_stats(paths[t]) for t in tags}
    for t in tags:
        d = disk[t]
        C.log(f"{t}: {d['bytes'] / 2**20:.1f} MiB, Linear bits/weight {fmt(d['linear_bpw'], 3)}"
              + (f", {d['ct']}" if "ct" in d else "") + (f", {d['tensor_types']}" if "tensor_types" in d else ""))
    # 2. load every output in fresh weightlab children, order reversed on every other repeat; repeat 0 also scores
    for rep in range(repeats):
        for t in (tags if rep % 2 == 0 else tags[::-1]):
            C.log(f"load {t} (repeat {rep + 1}/{repeats}) ...")
            r = child(f"load_{t}_r{rep}", t, "load", eval=rep == 0, check24=OUTPUTS[t][0] == "24", repeat=rep)
            C.log(f"  from_pretrained {r['load_s']:.2f} s, first forward {r['first_forward_s']:.2f} s, peak "
                  f"{r['peak_rss_mib']:.0f} MiB" + (f", PPL {r['quality']['ppl']:.3f}" if "quality" in r else "")
                  + (f", {r['check']}" if "check" in r else ""))
    total = time.perf_counter() - t_all
    note = " ".join(a for a in ("SMOKE" if SMOKE else "", f"--only {args.only}" if args.only else "",
                                "--skip-lc" if args.skip_lc else "", f"--repeats {repeats}" if repeats != 3 else "")
                    if a)
    (work / "state.json").write_text(json.dumps({"disk": disk, "data": data, "total_s": total, "note": note},
                                                default=str))
    body = render(results, disk, data, total, note)
    return CC.publish(body, work, SECTION, write, args.keep)


# ============================================================================ report

def _med(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    s = f"{statistics.median(xs):.2f}"
    return s + (f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else "")


def _scheme(d: dict) -> list:
    """The weight arguments that define the stored grid (llm-compressor also serializes observer, actorder, ...)."""
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
    return [{k: w.get(k) for k in keys} for w in d.get("ct", {}).get("weights", [])] + [d.get("ct", {}).get("format")]


def render(results: list[dict], disk: dict, data: dict, total_s: float, note: str) -> str:
    makes = {r["output"]: r for r in results if r["mode"] == "make"}
    loads: dict[str, list[dict]] = {}
    for r in results:
        if r["mode"] == "load":
            loads.setdefault(r["output"], []).append(r)
    ev = {t: next((r for r in rs if "quality" in r), None) for t, rs in loads.items()}
    ppl = {t: (r["quality"]["ppl"] if r else None) for t, r in ev.items()}
    lmed = {t: statistics.median(r["load_s"] for r in rs) for t, rs in loads.items()}
    wl_v = next((r["versions"] for r in results if r["tool"] == "weightlab"), {})
    lc_v = next((r["versions"] for r in results if r["tool"] == "llm-compressor"), {})
    lo, hi = CC.loadavg_range(results)
    threads = sorted({r.get("torch_threads") for r in results}, key=str)
    nrep = max((len(rs) for rs in loads.values()), default=0)
    lines = [f"Date: {C.today()}. Machine: {C.machine_line()}. " + C.load_sentence([lo, hi]) +
             " Compare outputs within this run.",
             f"Versions: weightlab {C.package_version('weightlab')} in .venv (torch {wl_v.get('torch', 'n/a')}, "
             f"transformers {wl_v.get('transformers', 'n/a')}, compressed-tensors "
             f"{wl_v.get('compressed-tensors', 'n/a')}: every output is loaded and scored here); llm-compressor "
             f"{lc_v.get('llmcompressor', 'n/a')} in .venv-lc (torch {lc_v.get('torch', 'n/a')}, transformers "
             f"{lc_v.get('transformers', 'n/a')}, compressed-tensors {lc_v.get('compressed-tensors', 'n/a')}). "
             f"torch threads per child: {threads} (the same for every child).", "",
             f"Protocol. SmolLM2-135M (fp32 folder of a Q4_1 GGUF). Calibration: {CC.NSAMPLES} x {CC.SEQLEN} tokens "
             f"(consecutive windows of the zoo's calibration split, ids sha {data.get('calib_ids_sha')}), the same id "
             f"tensor for both tools. **GPTQ**: 4-bit, groups of {GROUP}, symmetric, no act-order, damping 0.01, "
             "block 128, every Linear of the 30 blocks; weightlab = `run_sequential('quantize', ..., calib=ids, "
             "method='gptq', bits=4, group_size=64, sym=True, **sequential_writer(ck))` (what `weightlab quantize "
             "zoo:smollm2 -m gptq -b 4 -g 64` runs, with these ids); llm-compressor = `oneshot(GPTQModifier("
             "config_groups={Linear: int4 sym group 64}, ignore=[lm_head], actorder=None))` + "
             "`save_pretrained(save_compressed=True)`. **2:4**: weightlab = `prune -m sparsegpt --pattern 2:4 "
             "--format hf` (dense folder) then the GPTQ step on it, both with the same ids; llm-compressor = one "
             "`oneshot` with `[SparseGPTModifier(0.5, '2:4'), GPTQModifier(...)]`. **GGUF**: `weightlab export "
             "--format gguf --type T` of the dense model (Q4_K_M by weightlab's own K-quant packer unless "
             "llama-quantize is found). Every output and the source are loaded with "
             "`AutoModelForCausalLM.from_pretrained(folder)` (GGUF: `gguf_file=`) in fresh children of the weightlab "
             f"venv, {nrep} repeat(s), the order reversed every other repeat; held-out perplexity over "
             f"{CC.EVAL_TOKENS:,} tokens in {CC.SEQLEN}-token windows (weightlab.engine.evaluate.perplexity, the "
             "source's tokenizer for every output).",
             "**size** = bytes of the *.safetensors files (GGUF: the file); **Linear bits/w** = bytes of the 210 "
             "block Linears (packed codes + scales, or the GGUF blocks) x 8 / their weights, from the file headers; "
             "**load s** = `from_pretrained` wall time, median (min-max) over the repeats; **1st fwd s** = the first "
             "forward of 5 tokens (compressed-tensors decompresses there); **make s** = writing the output "
             "(compression included), one run; **peak** = peak RSS of the load child.", ""]
    rows = []
    for t, (group, tool, scheme) in OUTPUTS.items():
        if t not in disk:
            continue
        d, m, rs = disk[t], makes.get(t), loads.get(t, [])
        rows.append([tool, scheme, f"{d['bytes'] / 2**20:,.1f}", fmt(d.get("linear_bpw"), 3),
                     _med([r["load_s"] for r in rs]), _med([r["first_forward_s"] for r in rs]),
                     fmt(max((r["peak_rss_mib"] for r in rs), default=None), 0),
                     f"**{ppl[t]:.3f}**" if ppl.get(t) is not None else "n/a",
                     f"{fmt(m['make_s'])} ({fmt(m['make_cpu_s'])})" if m else "-"])
    lines += [C.md_table(["tool", "scheme", "size MiB", "Linear bits/w", "load s", "1st fwd s", "peak RSS MiB",
                          "PPL", "make s (CPU s)"], rows), ""]
    for t in ("wl_24", "lc_24"):
        c = (ev.get(t) or {}).get("check")
        if c:
            lines.append(f"- {OUTPUTS[t][1]} 2:4 + W4 as loaded: {c['sparsity']:.3f} zeros in the block Linears, "
                         f"{c['share_24_groups'] * 100:.1f} % of 4-column groups still 2:4 (GPTQ after pruning "
                         "updates later columns, pruned ones included, unless it keeps the mask).")
    for t in ("wl_gptq", "lc_gptq", "wl_24", "lc_24"):
        if t in disk and "ct" in disk[t]:
            ct = disk[t]["ct"]
            lines.append(f"- {t}: quantization_config format `{ct['format']}`, status `{ct['status']}`, weights "
                         f"{json.dumps(ct['weights'])}, ignore {ct['ignore']}")
    lines += ["", f"Targets and verdicts (weightlab vs llm-compressor, same data, same run): PPL <= lc x {PPL_SLACK}, "
              f"size <= lc x {SIZE_SLACK}, load median <= lc x {LOAD_SLACK} (load times are a few seconds and noisy)."]
    for g, name in (("gptq", f"GPTQ W4 g{GROUP}"), ("24", f"SparseGPT 2:4 + GPTQ W4 g{GROUP}")):
        a, b = f"wl_{g}", f"lc_{g}"
        if a not in disk or b not in disk or ppl.get(a) is None or ppl.get(b) is None:
            if a in disk:
                lines.append(f"- {name}: llm-compressor not run; weightlab PPL {fmt(ppl.get(a), 3)}, "
                             f"{disk[a]['bytes'] / 2**20:.1f} MiB")
            continue
        ok_p = ppl[a] <= ppl[b] * PPL_SLACK
        sr = disk[a]["bytes"] / disk[b]["bytes"]
        # load times per repeat, paired in run order (the order alternates between repeats)
        pairs = [x["load_s"] / y["load_s"] for x, y in zip(loads.get(a, []), loads.get(b, []))]
        same = _scheme(disk[a]) == _scheme(disk[b])
        lines.append(f"- {name}: PPL {ppl[a]:.3f} vs {ppl[b]:.3f}: **{'met' if ok_p else 'NOT met'}**; size "
                     f"{sr:.3f}x: **{'met' if sr <= SIZE_SLACK else 'NOT met'}**; load (median "
                     f"{lmed[a] / lmed[b]:.2f}x): **{C.ratio_verdict(pairs, LOAD_SLACK)}**; same weight scheme in "
                     f"config.json: {'yes' if same else 'NO'}")
    if ppl.get("dense") is not None:
        for t in GGUF_TYPES:
            k = f"gguf_{t}"
            if k in disk and ppl.get(k) is not None:
                rel = ppl[k] / ppl["dense"]
                want = {"q8_0": 8.5, "q4_0": 4.5}.get(t)
                bpw = disk[k]["linear_bpw"]
                lines.append(f"- GGUF {t.upper()}: {disk[k]['bytes'] / 2**20:.1f} MiB, Linear {bpw:.3f} bits/weight"
                             + (f" (expected {want}: **{'met' if abs(bpw - want) < 1e-6 else 'NOT met'}**)" if want
                                else f" (tensor types {disk[k]['tensor_types']})")
                             + f", PPL {ppl[k]:.3f} = {rel:.4f}x the dense {ppl['dense']:.3f}"
                             + (f" (Q8_0 target <= 1.01x: **{'met' if rel <= 1.01 else 'NOT met'}**)" if t == "q8_0"
                                else ""))
        if ppl.get("wl_gptq") is not None and ppl.get("gguf_q4_0") is not None:
            lines.append(f"- 4-bit with and without calibration: CT GPTQ W4 g64 PPL {ppl['wl_gptq']:.3f} vs GGUF Q4_0 "
                         f"(round-to-nearest, groups of 32) {ppl['gguf_q4_0']:.3f}"
                         + (f", Q4_K_M {ppl['gguf_q4_k_m']:.3f}" if ppl.get("gguf_q4_k_m") is not None else ""))
    lines += ["", f"Whole benchmark run: {total_s / 60:.1f} min" + (f" (partial run: {note})" if note else "") +
              f". Reproduce: `{REPRO}` (`--only gptq|24|gguf`, `--skip-lc`, `--repeats N`, `--threads N`, "
              f"`--no-write`, `--keep DIR` then `--render-only DIR`, `--smoke`); llm-compressor's venv: `{LC_SETUP}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
