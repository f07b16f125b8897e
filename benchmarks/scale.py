"""Scale: GPTQ and Wanda on a synthetic ~1B-parameter Llama stored as sharded bf16 safetensors.

Three ways, each tool in its own child process, repeats alternating (A B C A B C ...):
  weightlab sequential  - run_sequential: skeleton on meta, one block onloaded at a time, written out
  weightlab whole-model - from_pretrained (fp32) + quantize()/prune() in memory (not written)
  llm-compressor        - from_pretrained (fp32) + oneshot(GPTQModifier | WandaPruningModifier) (not written)
Same calibration ids (8 x 128 tokens of the zoo's wiki split, SmolLM2's tokenizer), GPTQ W4 g128
symmetric, damping 0.01, no act-order; Wanda 50 % unstructured; fp32 forwards; the same torch
thread count in every child. Measured: peak RSS of the child (/usr/bin/time -v or wait4), child
wall time, and the compress call's own time. The sequential child also writes its output (the
others do not), so its times include writing ~2 GB.

    python benchmarks/scale.py [--repeats 3] [--threads 2] [--only gptq|wanda] [--lc-python PATH]
    python benchmarks/scale.py --smoke      # a 4-layer model, one repeat; never written to RESULTS.md

llm-compressor runs in its own venv (.venv-lc, see _compress_common.LC_SETUP).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _compress_common as CC  # noqa: E402

SHAPE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)
NSAMPLES, SEQLEN = 8, 128
TITLE = "Scale: sequential onloading on a synthetic 1B Llama (GPTQ, Wanda) vs llm-compressor"


# ============================================================================ model

def write_model(out: Path, layers: int) -> dict:
    """Write the synthetic Llama shard by shard from a seeded generator (never the whole model in memory)."""
    import torch
    import transformers

    from weightlab.io.writer import CheckpointWriter
    from weightlab.zoo import smollm2

    shape = {**SHAPE, "num_hidden_layers": layers}
    cfg = transformers.LlamaConfig(**shape, torch_dtype="bfloat16", rms_norm_eps=1e-5, rope_theta=10000.0)
    d, f, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    hd = d // shape["num_attention_heads"]
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (shape["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    tok_dir = smollm2()
    n = 0
    with CheckpointWriter(out, max_shard_size="1GB", readme=False, force=True) as w:
        for name, s in shapes.items():
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * s[-1] ** -0.5
            w.add(name, t.to(torch.bfloat16))
            n += t.numel()
        w.add_file("config.json", cfg.to_json_string())
        for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tok_dir) / fn).is_file():
                w.add_file(fn, (Path(tok_dir) / fn).read_text(encoding="utf-8"))
    return {"params": n, "layers": layers, "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def calib_ids(model_dir: Path, work: Path) -> str:
    import torch
    from transformers import AutoTokenizer

    from weightlab.engine.calib_data import token_windows
    from weightlab.zoo import wiki_text

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = token_windows(tok, wiki_text("calib"), NSAMPLES, SEQLEN, sampling="consecutive")
    torch.save(ids, work / "calib_ids.pt")
    return str(work / "calib_ids.pt")


# ============================================================================ child

def child_main(spec_path: str) -> int:
    t_start = time.perf_counter()
    spec, res = CC.child_setup(spec_path)
    res.update({k: spec[k] for k in ("mode", "tag")})
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    ids = CC.load_ids(spec["ids_path"], (NSAMPLES, SEQLEN))
    method, mode = spec["method"], spec["mode"]
    # float32 solves: what llm-compressor does (weightlab's CPU default is float64, twice the d_in^2 memory)
    kw = ({"bits": 4, "group_size": 128, "sym": True, "precision": "float32"} if method == "gptq" else
          {"sparsity": 0.5})
    if mode == "sequential":
        from weightlab.compress.sequential import run_sequential

        res["import_s"] = time.perf_counter() - t_start
        with CC.Phase(res, "compress"):
            rep, info = run_sequential("quantize" if method == "gptq" else "prune", spec["model_dir"], spec["out"],
                                       force=True, calib=ids, method=method, hessian=method == "gptq",
                                       show_progress=False, **kw)
        res["estimate_host_mib"] = info["memory_estimate"]["host_bytes"] / 2**20
    else:
        from transformers import AutoModelForCausalLM

        if mode == "whole":
            from weightlab.compress import prune, quantize
        else:
            from datasets import Dataset
            from llmcompressor import oneshot
            from llmcompressor.modifiers.pruning import WandaPruningModifier
            from llmcompressor.modifiers.quantization import GPTQModifier
        res["import_s"] = time.perf_counter() - t_start
        with CC.Phase(res, "load"):
            model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                         local_files_only=True).eval()
            CC.materialize(model)
        batches = [{"input_ids": b, "use_cache": False} for b in ids.split(4)]
        with CC.Phase(res, "compress"):
            if mode == "whole" and method == "gptq":
                quantize(model, "gptq", calib=batches, show_progress=False, **kw)
            elif mode == "whole":
                prune(model, "wanda", calib=batches, show_progress=False, **kw)
            else:
                if method == "gptq":
                    recipe = GPTQModifier(config_groups={"g0": {"targets": ["Linear"], "weights": {
                        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}},
                        ignore=["lm_head"], dampening_frac=0.01, actorder=None)
                else:
                    recipe = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"],
                                                  ignore=["re:.*lm_head"])
                oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), recipe=recipe,
                        num_calibration_samples=NSAMPLES, max_seq_length=SEQLEN, shuffle_calibration_samples=False,
                        batch_size=1)
    return CC.child_finish(res, Path(spec["out_dir"]), spec["tag"], t_start)


# ============================================================================ driver

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["gptq", "wanda"])
    ap.add_argument("--skip-lc", action="store_true")
    ap.add_argument("--modes", default="sequential,whole,llm-compressor",
                    help="which of sequential, whole, llm-compressor to run (comma-separated)")
    ap.add_argument("--first-repeat", type=int, default=0, help="number the repeats from here (later invocations)")
    ap.add_argument("--lc-python")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", default=str(C.REPO_ROOT / ".bench-scale"))
    ap.add_argument("--render-only", action="store_true",
                    help="write the section from every result_*.json already in --work (runs of several invocations)")
    CC.add_threads_arg(ap)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(exist_ok=True)
    if a.render_only:
        meta = json.loads((work / "model-1b.json").read_text())
        results = [json.loads(f.read_text()) for f in sorted(work.glob("result_*.json"))]
        results = [r for r in results if "compress_s" in r]
        C.write_section(TITLE, render(meta, results, a.threads))
        print(render(meta, results, a.threads))
        return 0
    model_dir = work / ("model-smoke" if a.smoke else "model-1b")
    meta_p = work / f"{model_dir.name}.json"
    if not meta_p.exists():
        C.log(f"writing the synthetic model to {model_dir}")
        meta_p.write_text(json.dumps(write_model(model_dir, 4 if a.smoke else SHAPE["num_hidden_layers"])))
    meta = json.loads(meta_p.read_text())
    ids_path = calib_ids(model_dir, work)
    lc = None if (a.skip_lc or "llm-compressor" not in a.modes) else CC.lc_python(a.lc_python)
    modes = [("sequential", C.python_exe()), ("whole", C.python_exe())] + ([("llm-compressor", lc)] if lc else [])
    modes = [m for m in modes if m[0] in a.modes.split(",")]
    methods = [a.only] if a.only else ["gptq", "wanda"]
    results = []
    for method in methods:
        for r in range(a.first_repeat, a.first_repeat + (1 if a.smoke else a.repeats)):
            order = modes if r % 2 == 0 else modes[::-1]  # alternate who goes first
            for mode, py in order:
                tag = f"{method}-{mode}-{r}"
                C.warm_page_cache([model_dir])
                C.log(f"{tag} ...")
                res, _ = CC.run_child(__file__, {"tag": tag, "tool": mode, "mode": mode, "method": method,
                                                 "model_dir": str(model_dir), "ids_path": ids_path,
                                                 "out": str(work / f"out-{mode}"), "threads": a.threads},
                                      work, py, a.threads)
                C.log(f"{tag}: wall {res['wall_s']:.0f} s, compress {res['compress_s']:.0f} s, "
                      f"peak {res['peak_rss_mib']:.0f} MiB")
                results.append(res)
                shutil.rmtree(work / f"out-{mode}", ignore_errors=True)
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if not a.smoke:
        C.write_section(TITLE, render(meta, results, a.threads))
    print(render(meta, results, a.threads))
    return 0


def render(meta: dict, results: list[dict], threads) -> str:
    rows, verdicts = [], []
    for method in ("gptq", "wanda"):
        by = {m: [r for r in results if r["method"] == method and r["mode"] == m]
              for m in ("sequential", "whole", "llm-compressor")}
        if not by["sequential"]:
            continue
        for m, rs in by.items():
            if not rs:
                continue
            peaks = [r["peak_rss_mib"] for r in rs]
            walls = [r["wall_s"] for r in rs]
            comp = [r["compress_s"] for r in rs]
            rows.append([method, m, len(rs), f"{statistics.median(peaks):,.0f} ({min(peaks):,.0f}-{max(peaks):,.0f})",
                         f"{statistics.median(walls):,.0f} ({min(walls):,.0f}-{max(walls):,.0f})",
                         f"{statistics.median(comp):,.0f}"])
        seq, lcr = by["sequential"], by["llm-compressor"]
        if method == "gptq":
            worst = max(r["peak_rss_mib"] for r in seq) / 1024
            verdicts.append(f"GPTQ peak RSS, sequential: max {worst:.2f} GiB over {len(seq)} run(s) - target <= 1.5 GiB "
                            f"{'met' if worst <= 1.5 else 'NOT met'}.")
        if lcr:
            pairs = sorted(zip(sorted(seq, key=lambda r: r["tag"]), sorted(lcr, key=lambda r: r["tag"])),
                           key=lambda p: p[0]["tag"])
            ratios = [s["wall_s"] / l["wall_s"] for s, l in pairs]
            cpu = [s["child_cpu_s"] / l["child_cpu_s"] for s, l in pairs]
            lo, hi = min(ratios), max(ratios)
            v = "met" if hi <= 1 else ("not shown (runs straddle 1x)" if lo <= 1 else "NOT met")
            if len(ratios) < 3:
                v = f"not shown ({len(ratios)} pair(s); the protocol needs 3 alternating) - measured as " + (
                    "faster" if hi <= 1 else "slower")
            verdicts.append(f"{method} child wall time sequential / llm-compressor per pair: "
                            f"{', '.join(f'{x:.2f}x' for x in ratios)} (CPU seconds "
                            f"{', '.join(f'{x:.2f}x' for x in cpu)}) - target <= 1x {v}.")
    loads = [x for r in results for x in (r.get("loadavg_start"), r.get("loadavg_end")) if x is not None]
    v = next((r.get("versions", {}) for r in results if r["mode"] != "llm-compressor"), {})
    lcv = next((r.get("versions", {}) for r in results if r["mode"] == "llm-compressor"), {})
    return "\n".join([
        f"Model: synthetic Llama, {meta['params'] / 1e9:.2f} B parameters ({meta['layers']} layers, hidden 2048, "
        f"MLP 5632, 32 heads / 4 KV heads, vocab 49,152, tied), {meta['bytes'] / 2**30:.2f} GiB of bf16 safetensors in "
        f"1 GB shards, SmolLM2's tokenizer. Calibration: {NSAMPLES} x {SEQLEN} tokens (wiki calib split, consecutive "
        f"windows), the same ids for every tool. {C.machine_line()}; torch threads per child: {threads or 'default'}; "
        f"{C.load_sentence(loads)}. weightlab: torch {v.get('torch', 'n/a')}, transformers {v.get('transformers', 'n/a')}; "
        f"llm-compressor {lcv.get('llmcompressor', 'n/a')} (transformers {lcv.get('transformers', 'n/a')}) in its own venv.",
        "",
        "GPTQ: 4 bits, group 128, symmetric, damping 0.01, no act-order, float32 solves in both tools (weightlab's "
        "`precision=float32`; its CPU default is float64). Wanda: 50 % unstructured. Forwards in fp32 for "
        "every tool. **sequential** = weightlab's `run_sequential` (reads, compresses and *writes* the model block by "
        "block); **whole** = weightlab's in-memory path after `from_pretrained(dtype=float32)`; **llm-compressor** = "
        "`oneshot` on the same fp32 model (its sequential pipeline over decoder layers, model resident in host memory). "
        "Peak RSS = the child's maximum resident set (whole process: interpreter, torch, model, engine); wall = the "
        "whole child; compress = the prune/quantize/oneshot call alone (for sequential also the loading and writing).",
        "",
        C.md_table(["method", "path", "runs", "peak RSS MiB median (min-max)", "child wall s median (min-max)",
                    "compress s median"], rows),
        "",
        *[f"- {x}" for x in verdicts],
        "",
        "Reproduce: `python benchmarks/scale.py --threads 2` (GPTQ is ~20 min per run on 2 cores; `--only`, "
        "`--repeats` and `--render-only` let several invocations fill one section).",
    ])


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
