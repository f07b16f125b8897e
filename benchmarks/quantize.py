"""weightlab's quantizers and EoRA compensation on MiniLM and SmolLM2, against llm-compressor's GPTQ and AWQ in the same run.

    .venv/bin/python benchmarks/quantize.py                 # everything (~25 min on an idle 2-core box), updates RESULTS.md
    .venv/bin/python benchmarks/quantize.py --quick         # MiniLM: everything; SmolLM2: RTN and GPTQ at 4 bits, both tools
    .venv/bin/python benchmarks/quantize.py --only minilm --no-write
    .venv/bin/python benchmarks/quantize.py --skip-lc       # weightlab alone (no llm-compressor venv needed)
    .venv/bin/python benchmarks/quantize.py --awq-only      # SmolLM2: AWQ in both tools and RTN 4-bit (its own section)

llm-compressor lives in its own venv (.venv-lc; see _compress_common.LC_SETUP). Protocol:
  MiniLM (all-MiniLM-L6-v2, genuine fp32): calibration = 64 x 128 tokens of the zoo's Wikipedia calibration
    split (consecutive windows, no special tokens); quality = mean cosine between mean-pooled, L2-normalised
    embeddings of the quantized and the fp32 model on the first 200 sentences (>= 5 words) of gensim's
    lee_background.cor (weightlab.engine.evaluate.embedding_similarity in both venvs). Group 128, symmetric
    (llm-compressor's W4A16 preset; W3 = the same with 3 bits).
  SmolLM2-135M (fp32 folder of a Q4_1 GGUF, so compare methods with each other): the prune benchmark's
    protocol: 32 x 512 calibration tokens, held-out perplexity over 16,384 tokens. Group 64, symmetric
    (576 input columns are not a multiple of 128, which llm-compressor refuses).
  Targets: the Linear layers of the repeated blocks (SmolLM2: 210; MiniLM: 36; never embeddings, lm_head, pooler).
  Runs: dense; RTN and GPTQ at 4 and 3 bits (GPTQ configured as llm-compressor's default: static act-order,
    block 128, damping 0.01); PB-LLM 10 % salient (8-bit salient, the rest binarized, GPTQ reconstruction);
    the compensation chain SparseGPT 2:4 -> RTN 4-bit (a symmetric grid keeps the zeros) -> EoRA vs SVD at
    ranks 16 and 64 (merged). llm-compressor: GPTQModifier with the same int grid at 4 and 3 bits.
  AWQ (SmolLM2, 4-bit, its own RESULTS section): weightlab `quantize(model, "awq", 4, 64, sym=True)` (AWQ smoothing,
    then RTN) vs llm-compressor `[AWQModifier(), QuantizationModifier(same grid)]`, both with their defaults
    (duo scaling, 20 grid points, the Llama mappings); `--awq-nsamples N` calibrates both on the first N windows.
Every run is a child process (wall, peak RSS, and inside it phase times and CPU seconds); the weightlab/llm-compressor
pairs run --repeats rounds (default 3; rounds 2.. time the quantize call only), each round flipping the order.
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
from _compress_common import LC_SETUP, SMOKE, fmt  # noqa: E402

SECTION = "Quantize: MiniLM and SmolLM2, weightlab vs llm-compressor GPTQ"
SECTION_AWQ = "Quantize: AWQ on SmolLM2, weightlab vs llm-compressor"
REPRO = ".venv/bin/python benchmarks/quantize.py"
MODELS = {
    "minilm": {"nsamples": 8 if SMOKE else 64, "seqlen": 128, "group": 128, "sentences": 40 if SMOKE else 200},
    "smollm2": {"nsamples": CC.NSAMPLES, "seqlen": CC.SEQLEN, "group": 64},
}
BITS = (4, 3)
SALIENT = 0.1
RANKS = (16, 64)
COS_SLACK, PPL_SLACK = 0.001, 1.01  # targets vs llm-compressor: cosine >= lc - 0.001, PPL <= lc x 1.01


# ============================================================================ children (stdlib at top level only)

def child_main(spec_path: str) -> int:
    t_start = time.perf_counter()
    spec, res = CC.child_setup(spec_path)
    res.update({k: spec[k] for k in ("model", "bits", "tag")})
    res["calib_batch"] = spec.get("calib_batch")
    res["attn"] = spec.get("attn")
    import copy

    import torch

    tool, method, mname = spec["tool"], spec["method"], spec["model"]
    mp = MODELS[mname]
    if tool == "weightlab":
        from weightlab.compress import compensate, prune, quantize
    else:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        if method == "awq":
            from llmcompressor.modifiers.transform import AWQModifier
            from llmcompressor.pipelines.cache import IntermediatesCache

            if not torch_accelerator():  # 0.14.0.1's AWQ pins its cached inputs: pin_memory() raises without an
                IntermediatesCache.pin_memory = lambda self, *a, **k: None  # accelerator; pinning only speeds copies
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    res["import_s"] = time.perf_counter() - t_start
    res["rss_after_imports_mib"] = CC.status_mib()["VmRSS"]
    auto = AutoModelForCausalLM if mname == "smollm2" else AutoModel
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    model = auto.from_pretrained(spec["model_dir"], dtype=torch.float32, local_files_only=True).eval()
    res["model_mib"] = CC.model_bytes(model) / 2**20
    original = copy.deepcopy(model) if (mname == "minilm" or method == "chain") else None
    ids = CC.load_ids(spec["ids_path"], (mp["nsamples"], mp["seqlen"]))
    nsamples = spec.get("nsamples") or mp["nsamples"]  # AWQ runs may calibrate on the first N windows only
    ids = ids[:nsamples]
    res["nsamples"] = nsamples
    res["calib_ids_sha"] = CC.sha(ids)
    # the same batches for every weightlab call: 4 windows, no padding, no special tokens
    extra = {"use_cache": False} if mname == "smollm2" else {}  # a KV cache would carry keys across batches
    batches = [{"input_ids": b, **extra} for b in ids.split(spec.get("calib_batch") or 4)]
    text = Path(spec["eval_path"]).read_text(encoding="utf-8")

    res["repeat"] = spec.get("repeat", 1)

    def evaluate() -> dict:
        res.setdefault("weights_sha", _weights_sha(targets))  # the quantized weights, before any compensation
        if spec.get("time_only"):  # a timing repeat: its weights are checked equal to repeat 1's by that hash
            return {}
        with CC.Phase(res, "eval"):
            if mname == "smollm2":
                r = CC.eval_perplexity(model, tok, text)
                return {"ppl": r["perplexity"], "tokens": r["tokens"], "eval_ids_sha": r["eval_ids_sha"]}
            from weightlab.engine.evaluate import embedding_similarity

            r = embedding_similarity(model, original, tok, json.loads(text))
            return {"cos": r["cosine_mean"], "cos_min": r["cosine_min"], "sentences": r["sentences"]}

    targets = _targets(model)
    res["targets"] = len(targets)
    qkw = {"sym": True, "calib": batches, "show_progress": False}
    if spec.get("scale_dtype"):  # the AWQ section: scales in the weights' dtype (fp32), as llm-compressor stores them
        qkw["scale_dtype"] = spec["scale_dtype"]
    if method == "dense":
        res["quality"] = evaluate()
    elif tool == "llm-compressor":
        grid = {"num_bits": spec["bits"], "type": "int", "symmetric": True, "strategy": "group",
                "group_size": mp["group"]}
        quant = {"config_groups": {"g0": {"targets": ["Linear"], "weights": grid}},
                 "ignore": ["re:.*lm_head", "re:.*pooler.*"]}
        # AWQ: its defaults (duo_scaling=True, n_grid=20, mappings inferred for LlamaForCausalLM), then RTN
        recipe = [AWQModifier(), QuantizationModifier(**quant)] if method == "awq" else GPTQModifier(**quant)
        ds = Dataset.from_dict({"input_ids": ids.tolist()})
        with CC.Phase(res, "quant"):
            oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=nsamples,
                    max_seq_length=mp["seqlen"], shuffle_calibration_samples=False, batch_size=1)
        if method == "awq":
            _fake_quantize_lc(targets)
        res["check"] = _check_levels(targets, spec["bits"], mp["group"])
        res["quality"] = evaluate()
    elif method in ("rtn", "gptq", "pbllm", "awq"):
        params = {"act_order": True, "static_groups": True} if method == "gptq" else {}
        if method == "pbllm":
            params = {"salient": SALIENT}
        if spec.get("attn"):  # llm-compressor's calibration runs eager attention (use_eager_attention)
            model.set_attn_implementation(spec["attn"])
        with CC.Phase(res, "quant"):
            rep = quantize(model, method, None if method == "pbllm" else spec["bits"], mp["group"], **qkw, **params)
        if spec.get("attn"):
            model.set_attn_implementation("sdpa")  # evaluated as every other run
        res["bits_per_weight"] = rep.bits_per_weight
        res["rel_weight_error"] = rep.as_dict()["rel_weight_error"]
        res["check"] = (_check_levels(targets, spec["bits"], mp["group"]) if method != "pbllm" else
                        {"salient_share": _salient_share(rep)})
        if method == "awq":
            done = [t for t in rep.transforms if "skipped" not in t]
            res["awq"] = {"mappings": len(done), "skipped": len(rep.transforms) - len(done),
                          "error_vs_rtn": sum(t["best_error"] / t["initial_error"] for t in done) / len(done),
                          "ratios": [t["ratio"] for t in done]}
        res["quality"] = evaluate()
    elif method == "chain":
        with CC.Phase(res, "prune"):
            prune(model, "sparsegpt", 0.5, pattern="2:4", calib=batches, show_progress=False)
        with CC.Phase(res, "quant"):
            rep = quantize(model, "rtn", 4, mp["group"], sym=True, show_progress=False)
        res["bits_per_weight"] = rep.bits_per_weight
        res["check"] = {**_check_levels(targets, 4, mp["group"]), **_check_24(targets)}
        res["quality"] = evaluate()
        compressed = {n: m.weight.detach().clone() for n, m in targets.items()}
        res["stages"] = {}
        for cm in ("svd", "eora"):
            for rank in RANKS:
                with torch.no_grad():
                    for n, m in targets.items():
                        m.weight.copy_(compressed[n])
                key = f"{cm}{rank}"
                ph = {"method": "EoRA" if cm == "eora" else "SVD", "rank": rank}
                with CC.Phase(ph, "comp"):
                    crep = compensate(model, original, cm, rank, calib=batches if cm == "eora" else None,
                                      show_progress=False)
                d = crep.as_dict()
                ph["adapter_params"] = d["adapter_params"]
                ph["input_weighted_error_ratio"] = d.get("input_weighted_error_ratio")
                ph["rel_weight_error_after"] = _mean(r["rel_weight_error_after"] for r in d["layers"])
                ph["rel_weight_error_before"] = _mean(r["rel_weight_error_before"] for r in d["layers"])
                ph["quality"] = evaluate()
                ph["eval_s"] = res["eval_s"]
                res["stages"][key] = ph
    else:
        raise SystemExit(f"unknown run {tool} {method}")
    return CC.child_finish(res, Path(spec["out_dir"]), spec["tag"], t_start)


def torch_accelerator() -> bool:
    import torch

    return bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available())


def _fake_quantize_lc(targets: dict) -> None:
    """llm-compressor's QuantizationModifier keeps the (AWQ-smoothed) float weights and quantizes them in each
    forward; the fake-quantized values are written into the weights (idempotent under that forward), so the
    level check and the evaluation see the model vLLM would serve."""
    import torch
    from compressed_tensors.quantization import forward_quantize

    with torch.no_grad():
        for m in targets.values():
            m.weight.copy_(forward_quantize(m, m.weight, "weight", m.quantization_scheme.weights))


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _targets(model) -> dict:
    """The Linear layers of the repeated blocks (what weightlab quantizes; llm-compressor's targets minus ignores)."""
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (".layers." in n or ".layer." in n)}


def _weights_sha(targets: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for n in sorted(targets):
        digest.update(targets[n].weight.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_levels(targets: dict, bits: int, group: int) -> dict:
    """The most distinct values in any (row, group) of any target weight: a b-bit grid has at most 2^b."""
    worst = 0
    for m in targets.values():
        w = m.weight.detach()
        rows, cols = w.shape
        pad = (-cols) % group
        g = torch_pad(w, pad).reshape(rows, -1, group)
        s = g.sort(-1).values
        distinct = (s[..., 1:] != s[..., :-1]).sum(-1) + 1
        worst = max(worst, int(distinct.max()))
    return {"max_levels_per_group": worst, "allowed_levels": 2 ** bits}


def torch_pad(w, pad: int):
    import torch

    # a partial last group is padded with copies of its first value (adds no new level)
    return w if pad == 0 else torch.cat([w, w[:, -1:].expand(-1, pad)], 1)


def _check_24(targets: dict) -> dict:
    bad = 0
    for m in targets.values():
        w = m.weight.detach()
        bad += int(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) < 2).sum())
    return {"groups_violating_2:4": bad}


def _salient_share(rep) -> float:
    n = s = 0
    for q in rep.quantized.values():
        if hasattr(q, "salient"):
            s += int(q.salient.sum())
            n += q.salient.numel()
    return s / n if n else float("nan")


# ============================================================================ driver

def prepare(work: Path, models: set) -> dict:
    import torch
    from transformers import AutoTokenizer

    from weightlab.zoo import minilm, wiki_text

    out = {}
    if "smollm2" in models:
        d = CC.prepare_smollm2(work)
        out["smollm2"] = {"model_dir": d["model_dir"], "ids_path": d["ids_path"], "eval_path": d["heldout_path"],
                          "calib_ids_sha": d["calib_ids_sha"]}
    if "minilm" in models:
        mp = MODELS["minilm"]
        model_dir = minilm()
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        ids = tok(wiki_text("calib"), add_special_tokens=False)["input_ids"][: mp["nsamples"] * mp["seqlen"]]
        ids = torch.tensor(ids, dtype=torch.int64).view(mp["nsamples"], mp["seqlen"])
        torch.save(ids, work / "minilm_ids.pt")
        (work / "minilm_sentences.json").write_text(json.dumps(lee_sentences(mp["sentences"])))
        out["minilm"] = {"model_dir": str(model_dir), "ids_path": str(work / "minilm_ids.pt"),
                         "eval_path": str(work / "minilm_sentences.json"), "calib_ids_sha": CC.sha(ids)}
    return out


def lee_sentences(n: int) -> list[str]:
    """The first ``n`` sentences of at least 5 words of gensim's lee_background.cor (baselines.md)."""
    import re

    from gensim.test.utils import datapath

    text = " ".join(Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace").split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5][:n]


def plan(args) -> list[dict]:
    models = [m for m in ("minilm", "smollm2") if not args.only or m in args.only.split(",")]
    runs = []
    flip = False
    for m in models:
        quick_llm = args.quick and m == "smollm2"
        runs.append({"model": m, "tool": "weightlab", "method": "dense", "bits": None})
        for bits in BITS[:1] if quick_llm else BITS:
            runs.append({"model": m, "tool": "weightlab", "method": "rtn", "bits": bits})
            pair = [{"model": m, "tool": "weightlab", "method": "gptq", "bits": bits},
                    {"model": m, "tool": "llm-compressor", "method": "gptq", "bits": bits}]
            runs += pair[::-1] if flip else pair
            flip = not flip
        if args.noise or args.noise_only:  # GPTQ again with calibration batches of 1: the implementation's own spread
            runs += [{"model": m, "tool": "weightlab", "method": "gptq", "bits": b, "calib_batch": 1}
                     for b in (BITS if m == "minilm" else BITS[1:])]
        if not quick_llm:
            runs.append({"model": m, "tool": "weightlab", "method": "pbllm", "bits": 1})
            runs.append({"model": m, "tool": "weightlab", "method": "chain", "bits": 4})
        if m == "smollm2" and not quick_llm and not args.skip_awq:
            runs += _awq_pair(args)
    if args.awq_only:  # the AWQ section alone: the pair and RTN at the same grid (fp32: the section above)
        runs = _awq_pair(args) + [{"model": "smollm2", "tool": "weightlab", "method": "rtn", "bits": 4,
                                   "scale_dtype": "float32"}]
    runs = ([] if args.timing_only else runs) + _timing_rounds(runs, args.repeats, args.timing_pairs)
    if args.skip_lc:
        runs = [r for r in runs if r["tool"] != "llm-compressor"]
    if args.noise_only:
        runs = [r for r in runs if r.get("calib_batch")]
    for r in runs:
        r["tag"] = (f"{r['model']}_{'wl' if r['tool'] == 'weightlab' else 'lc'}_{r['method']}{r['bits'] or ''}"
                    + (f"_b{r['calib_batch']}" if r.get("calib_batch") else "")
                    + (f"_n{r['nsamples']}" if r.get("nsamples") else "")
                    + ("_s32" if r.get("scale_dtype") == "float32" and r["tool"] == "weightlab" else "")
                    + (f"_{r['attn']}" if r.get("attn") else "") + (f"_r{r['repeat']}" if r.get("repeat") else ""))
    return runs


def _timing_rounds(runs: list[dict], repeats: int, only: str | None = None) -> list[dict]:
    """Rounds 2..repeats of every weightlab/llm-compressor pair (or those named in ``only``: 'minilm,smollm2:4'):
    the quantize call only (no evaluation), each round flipping which tool goes first."""
    keep = [x.strip().split(":") for x in only.split(",")] if only else None
    for k in keep or []:
        if k[0] not in MODELS or len(k) > 2 or (len(k) == 2 and k[1] not in {str(b) for b in BITS}):
            sys.exit(f"--timing-pairs: {':'.join(k)!r} is not MODEL or MODEL:BITS (models {', '.join(MODELS)}; "
                     f"bits {', '.join(map(str, BITS))})")
    lc = [r for r in runs if r["tool"] == "llm-compressor"
          and (keep is None or any(k[0] == r["model"] and (len(k) == 1 or k[1] == str(r["bits"])) for k in keep))]
    out = []
    for k in range(2, max(1, repeats) + 1):
        for i, o in enumerate(lc):
            wl = next((r for r in runs if r["tool"] == "weightlab" and r["model"] == o["model"]
                       and r["method"] == o["method"] and r["bits"] == o["bits"]), None)
            if wl is None:
                continue
            first = runs.index(wl) < runs.index(o)
            pair = [{**wl, "repeat": k, "time_only": True}, {**o, "repeat": k, "time_only": True}]
            out += pair if first == (k % 2 == 1) else pair[::-1]
    return out


def _awq_pair(args) -> list[dict]:
    n = args.awq_nsamples if args.awq_nsamples and args.awq_nsamples != CC.NSAMPLES else None
    extra = {"nsamples": n} if n else {}
    # weightlab under llm-compressor's calibration conditions: fp32 scales (the weights' dtype; fp16 rounding
    # of the scale moves every group's largest weight off its rounding tie), batches of 1 sequence, eager
    # attention (llm-compressor forces it while calibrating); --noise adds weightlab's defaults (batches of 4,
    # sdpa): what last-bit differences in the activations do
    runs = [{"model": "smollm2", "tool": "llm-compressor", "method": "awq", "bits": 4, **extra},
            {"model": "smollm2", "tool": "weightlab", "method": "awq", "bits": 4, **extra, "scale_dtype": "float32",
             "calib_batch": 1, "attn": "eager"}]
    if args.noise or args.noise_only:
        runs.append({"model": "smollm2", "tool": "weightlab", "method": "awq", "bits": 4, **extra,
                     "scale_dtype": "float32"})
    return runs


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM: every run; SmolLM2: dense, RTN and GPTQ at 4 bits")
    ap.add_argument("--only", help="comma-separated models: minilm, smollm2")
    ap.add_argument("--skip-lc", action="store_true", help="weightlab only")
    ap.add_argument("--noise", action="store_true",
                    help="also run weightlab's GPTQ with calibration batches of 1 (its numerical spread; SmolLM2: 3-bit)")
    ap.add_argument("--noise-only", action="store_true", help="only those --noise runs")
    ap.add_argument("--awq-only", action="store_true",
                    help="SmolLM2 only: AWQ 4-bit in both tools and RTN 4-bit; writes the AWQ section alone")
    ap.add_argument("--awq-nsamples", type=int, default=None,
                    help=f"calibration windows for the AWQ runs (both tools; default {CC.NSAMPLES})")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of each weightlab/llm-compressor pair (rounds 2.. time the quantize call only; default 3)")
    ap.add_argument("--timing-pairs", help="repeat only these pairs, e.g. 'minilm,smollm2:4' (default: every pair)")
    ap.add_argument("--timing-only", action="store_true",
                    help="only rounds 2.. of the pairs (merge with a full run's folder: --render-only FULL THIS)")
    ap.add_argument("--skip-awq", action="store_true", help="leave out the AWQ pair (its own section; see --awq-only)")
    ap.add_argument("--lc-python", help="python of the llm-compressor venv (default .venv-lc/bin/python)")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even for a partial run")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--keep", help="keep the work folder (ids, per-run JSON) at this path")
    ap.add_argument("--note", action="append", help="a line on how the run was done, printed under the date (repeatable)")
    ap.add_argument("--render-only", metavar="DIR", nargs="+",
                    help="re-render the section from kept work folder(s) (several: merged, the first wins)")
    CC.add_threads_arg(ap)
    args = ap.parse_args(argv)
    if args.render_only:  # several folders: merged in order, the first one's result wins for a run
        results, total, notes = [], 0.0, []
        for work in map(Path, args.render_only):
            rs = [json.loads(p.read_text()) for p in work.glob("result_*.json")]
            rs = sorted((r for r in rs if "wall_s" in r), key=lambda r: r.get("order", 0))
            results += [r for r in rs if r["tag"] not in {x["tag"] for x in results}]
            lines = (work / "total_s.txt").read_text().splitlines() if (work / "total_s.txt").exists() else ["0", ""]
            total += float(lines[0])
            notes += [lines[1]] if len(lines) > 1 and lines[1].strip() else []
        note = "; ".join(notes)
        if len(args.render_only) > 1:
            note = f"{len(args.render_only)} invocations merged" + (f": {note}" if note else "")
        data = {}
        for work in reversed(args.render_only):
            data.update(json.loads((Path(work) / "data.json").read_text()))
        for section, body in _bodies(results, data, total, note, awq_only="--awq-only" in note):
            body = CC.add_notes(body, args.note)
            print(body)
            if not args.no_write and not SMOKE:
                C.write_section(section, body)
        return 0
    runs = plan(args)
    lc_py = CC.lc_python(args.lc_python) if any(r["tool"] == "llm-compressor" for r in runs) else None
    partial = bool(args.quick or args.only or args.skip_lc or args.noise_only or args.timing_only)
    write = not args.no_write and (args.write or not partial or args.awq_only) and not SMOKE
    t_all = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="wl-quant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    C.log(f"work folder {work}; {len(runs)} runs: " + ", ".join(r["tag"] for r in runs))
    data = prepare(work, {r["model"] for r in runs})
    (work / "data.json").write_text(json.dumps(data))
    C.warm_page_cache([d["model_dir"] for d in data.values()])
    results = []
    for r in runs:
        C.log(f"{r['tag']} ...")
        res, cr = CC.run_child(__file__, {**r, **data[r["model"]]}, work,
                               C.python_exe() if r["tool"] == "weightlab" else lc_py, args.threads)
        res["order"] = len(results)
        (work / f"result_{r['tag']}.json").write_text(json.dumps(res, indent=1))
        results.append(res)
        q = res.get("quality", {})
        C.log(f"  wall {cr.wall_s:.1f}s, quant {res.get('quant_s', 0):.1f}s (cpu {res.get('quant_cpu_s', 0):.1f}s), "
              f"{_qual(q)}, peak {cr.peak_rss_mib:.0f} MiB, check {res.get('check')}"
              + "".join(f"; {k}: {_qual(v['quality'])} in {v['comp_s']:.1f}s" for k, v in res.get("stages", {}).items()))
    total = time.perf_counter() - t_all
    note = " ".join(a for a in ("--quick" if args.quick else "", f"--only {args.only}" if args.only else "",
                                "--skip-lc" if args.skip_lc else "", "--awq-only" if args.awq_only else "",
                                "--skip-awq" if args.skip_awq else "",
                                f"--timing-pairs {args.timing_pairs}" if args.timing_pairs else "",
                                "--timing-only" if args.timing_only else "",
                                f"--awq-nsamples {args.awq_nsamples}" if args.awq_nsamples else "") if a)
    (work / "total_s.txt").write_text(f"{total}\n{note}\n")
    bodies = [(sec, CC.add_notes(b, args.note)) for sec, b in _bodies(results, data, total, note, awq_only=args.awq_only)]
    for section, body in bodies[:-1]:
        print("\n" + body)
        if write:
            C.write_section(section, body)
    return CC.publish(bodies[-1][1], work, bodies[-1][0], write, args.keep)


def _bodies(results: list[dict], data: dict, total: float, note: str, awq_only: bool = False) -> list[tuple[str, str]]:
    """(section, body) pairs: the main section (without AWQ runs), then the AWQ section when AWQ ran."""
    out = []
    if not awq_only and any(r["method"] != "awq" for r in results):
        out.append((SECTION, render([r for r in results if r["method"] != "awq"], data, total, note)))
    if any(r["method"] == "awq" for r in results):
        out.append((SECTION_AWQ, render_awq(results, total, note)))
    return out


def _qual(q: dict) -> str:
    if "ppl" in q:
        return f"PPL {q['ppl']:.3f}"
    if "cos" in q:
        return f"cos {q['cos']:.4f} (min {q['cos_min']:.4f})"
    return "-"


# ============================================================================ report

def pair_rounds(results: list[dict]) -> dict:
    """(model, method, bits) -> [(weightlab run, llm-compressor run) per round]. The weightlab member of a pair is
    the run without calib_batch (AWQ: the one under llm-compressor's conditions, eager attention)."""
    runs = {}
    for r in results:
        paired = r.get("attn") if r["method"] == "awq" else not r.get("calib_batch")
        if r["tool"] == "llm-compressor" or paired:
            runs.setdefault((r["model"], r["method"], r.get("bits"), r.get("repeat", 1)), {})[r["tool"]] = r
    out = {}
    for (m, meth, bits, k), d in sorted(runs.items(), key=lambda kv: kv[0][3]):
        if len(d) == 2 and "quant_s" in d["weightlab"] and "quant_s" in d["llm-compressor"]:
            out.setdefault((m, meth, bits), []).append((d["weightlab"], d["llm-compressor"]))
    return out


def time_verdict(pairs: list) -> str:
    """Per-round wall and CPU ratios of the quantize call, judged by the 3-alternating-rounds rule."""
    wall = [a["quant_s"] / b["quant_s"] for a, b in pairs]
    cpu = [a["quant_cpu_s"] / b["quant_cpu_s"] for a, b in pairs]
    same = all(x.get("weights_sha") == pairs[0][i].get("weights_sha") for ab in pairs for i, x in enumerate(ab))
    secs = [" / ".join(f"{x[i]['quant_s']:.1f}" for x in pairs) for i in (0, 1)]
    return (f"time per round {', '.join(f'{x:.2f}x' for x in wall)}: **{C.ratio_verdict(wall, 1.0)}** (CPU "
            f"{', '.join(f'{x:.2f}x' for x in cpu)}: {C.ratio_verdict(cpu, 1.0)}; quantize s weightlab {secs[0]}, "
            f"llm-compressor {secs[1]}; same weights every round: {'yes' if same else 'NO'})")


def render(results: list[dict], data: dict, total_s: float, note: str) -> str:
    lo, hi = CC.loadavg_range(results)
    rounds = pair_rounds(results)
    results = [r for r in results if r.get("repeat", 1) == 1]
    by = {(r["model"], r["tool"], r["method"], r.get("bits"), r.get("calib_batch")): r for r in results}
    wl_v = next((r["versions"] for r in results if r["tool"] == "weightlab"), {})
    lc_v = next((r["versions"] for r in results if r["tool"] == "llm-compressor"), {})
    lines = [f"Date: {C.today()}. Machine: {C.machine_line()}. " + C.load_sentence([lo, hi]) + " Compare tools within this run.",
             f"Versions: weightlab {C.package_version('weightlab')} in .venv (torch {wl_v.get('torch', 'n/a')}, "
             f"transformers {wl_v.get('transformers', 'n/a')}); llm-compressor {lc_v.get('llmcompressor', 'n/a')} in "
             f".venv-lc (torch {lc_v.get('torch', 'n/a')}, transformers {lc_v.get('transformers', 'n/a')}, "
             f"compressed-tensors {lc_v.get('compressed-tensors', 'n/a')}). torch threads per child: "
             f"{sorted({r.get('torch_threads') for r in results}, key=str)} (the same for both tools).", "",
             "Protocol. **MiniLM** (all-MiniLM-L6-v2, genuine fp32): calibration 64 x 128 tokens of the zoo's "
             "Wikipedia calibration split (consecutive windows, no special tokens); quality = mean cosine of mean-pooled, "
             "L2-normalised sentence embeddings vs the fp32 model on the first 200 sentences (>= 5 words) of gensim's "
             "`lee_background.cor` (min over sentences in brackets); groups of 128. **SmolLM2-135M**: calibration "
             "32 x 512 tokens, held-out perplexity over 16,384 tokens (16,352 scored, the prune benchmark's protocol); "
             "its fp32 weights are a dequantized Q4_1 GGUF, so compare methods with each other; groups of 64 (576 "
             "columns are not a multiple of 128, which llm-compressor refuses). Both: symmetric integer grids, every "
             "Linear of the repeated blocks (MiniLM 36, SmolLM2 210), fake-quantized in memory and scored by the same "
             "weightlab evaluation code in both venvs. weightlab GPTQ = `quantize(model, 'gptq', BITS, GROUP, "
             "sym=True, act_order=True, static_groups=True)` (llm-compressor's default actorder 'static'; block 128, "
             "damping 0.01; scales stored in fp16), calibration batches of 4. llm-compressor = `oneshot(model, "
             "dataset=Dataset({'input_ids': ids}), recipe=GPTQModifier(config_groups={targets: Linear, weights: "
             "int BITS symmetric group GROUP}, ignore=[lm_head, pooler]), batch_size=1, shuffle off)`. PB-LLM: 10 % "
             "salient weights by magnitude on an 8-bit per-row grid, the rest binarized (per-row mean + alpha sign), "
             "GPTQ reconstruction. Compensation chain: SparseGPT 2:4 -> RTN 4-bit symmetric (zero is on the grid, "
             "so 2:4 survives; checked) -> EoRA (input-covariance eigenspace, same calibration) or plain SVD of "
             "W - W_c, rank 16 and 64, merged for evaluation (as adapters they are extra parameters).",
             f"Each run is its own child process. The weightlab/llm-compressor pairs run "
             f"{max(map(len, rounds.values()), default=1)} round(s), each round flipping which tool goes first; round 1 "
             "also evaluates (the tables), later rounds time the quantize call only and must give the same weights "
             "(checked by a hash of every quantized matrix); other runs once. **quant s** = the `quantize(...)` / `oneshot(...)` call "
             "(wall; CPU seconds in brackets); **wall** = the whole child; **levels** = most distinct values in any "
             "(row, group) of any target weight (a b-bit grid: at most 2^b).", ""]
    for mname in ("minilm", "smollm2"):
        rs = [r for r in results if r["model"] == mname]
        if not rs:
            continue
        qname = "mean cos" if mname == "minilm" else "PPL"
        lines += [f"**{'MiniLM-L6 (fp32)' if mname == 'minilm' else 'SmolLM2-135M'}**", ""]
        rows = []
        for r in rs:
            if r["method"] == "chain":
                continue
            o = None if r.get("calib_batch") else by.get(
                (mname, "llm-compressor" if r["tool"] == "weightlab" else "weightlab", r["method"], r.get("bits"), None))
            rq, tr = _qnum(r), None
            if o is not None and r["tool"] == "weightlab":
                tr = r["quant_s"] / o["quant_s"]
            label = {"dense": "fp32", "rtn": f"RTN {r['bits']}-bit", "gptq": f"GPTQ {r['bits']}-bit",
                     "pbllm": f"PB-LLM {int(SALIENT * 100)} % salient"}[r["method"]]
            tool = r["tool"] + (f" (calib batch {r['calib_batch']})" if r.get("calib_batch") else "")
            rows.append([label, tool, f"**{_qfmt(rq, mname)}**", fmt(r.get("bits_per_weight"), 3),
                         f"{fmt(r.get('quant_s'))} ({fmt(r.get('quant_cpu_s'))})" if "quant_s" in r else "-",
                         fmt(r["wall_s"]), fmt(r["peak_rss_mib"], 0),
                         str(r.get("check", {}).get("max_levels_per_group", "-")),
                         C.fmt_ratio(tr)])
        lines += [C.md_table(["method", "tool", qname, "bits/weight", "quant s (CPU s)", "wall s", "peak RSS MiB",
                              "levels", "time ratio wl/lc (round 1)"], rows), ""]
        ch = by.get((mname, "weightlab", "chain", 4, None))
        if ch:
            ck = ch["check"]
            lines.append(f"Compensation chain: SparseGPT 2:4 ({fmt(ch['prune_s'])} s) -> RTN 4-bit ({fmt(ch['quant_s'], 2)} s, "
                         f"{ch['bits_per_weight']:.3f} bits/weight, {ck['groups_violating_2:4']} groups violating 2:4, "
                         f"at most {ck['max_levels_per_group']} levels per group): {qname} **{_qfmt(_qnum(ch), mname)}**.")
            rows = []
            for key, st in ch["stages"].items():
                rows.append([st["method"], st["rank"], f"**{_qfmt(_qnum(st), mname)}**", f"{st['adapter_params']:,}",
                             f"{st['rel_weight_error_before']:.4f} -> {st['rel_weight_error_after']:.4f}",
                             "n/a" if st.get("input_weighted_error_ratio") is None else f"{st['input_weighted_error_ratio']:.4f}",
                             f"{fmt(st['comp_s'])} ({fmt(st['comp_cpu_s'])})"])
            lines += ["", C.md_table(["compensation", "rank", qname, "extra params", "mean rel. weight error",
                                      "input-weighted error after/before", "s (CPU s)"], rows), ""]
    lines.append("Targets and verdicts (weightlab vs llm-compressor GPTQ, same grid, same run): quality no worse "
                 f"(cosine >= lc - {COS_SLACK}; PPL <= lc x {PPL_SLACK}) and no slower (the quantize call, wall, in "
                 "every round: met only when at least 3 alternating rounds all meet it, 'not shown' when they straddle "
                 "the target).")
    q_ok, q_miss = [], []
    for r in results:
        o = by.get((r["model"], "llm-compressor", r["method"], r.get("bits"), None))
        if r["tool"] != "weightlab" or o is None:
            continue
        if r.get("calib_batch"):
            main = by.get((r["model"], "weightlab", r["method"], r.get("bits"), None))
            if main is not None:
                lines.append(f"- spread of weightlab itself: {r['model']} GPTQ {r['bits']}-bit with calibration batches "
                             f"of {r['calib_batch']} instead of 4 (same sequences, only the float32 summation order of "
                             f"H changes): {_qfmt(_qnum(r), r['model'])} vs {_qfmt(_qnum(main), r['model'])}")
            continue
        a, b = _qnum(r), _qnum(o)
        ok_q = a >= b - COS_SLACK if r["model"] == "minilm" else a <= b * PPL_SLACK
        q_ok.append(ok_q)
        if not ok_q:
            q_miss.append(f"{r['model']} {r['bits']}-bit ({_qfmt(a, r['model'])} vs {_qfmt(b, r['model'])})")
        lines.append(f"- {r['model']} GPTQ {r['bits']}-bit: {_qfmt(a, r['model'])} vs {_qfmt(b, r['model'])}: "
                     f"**{'met' if ok_q else 'NOT met'}**; " + time_verdict(rounds[(r["model"], r["method"], r["bits"])]))
    for mname in ("minilm", "smollm2"):
        lines += _method_verdicts(by, mname)
    if any(r["tool"] == "llm-compressor" for r in results):
        lines += ["", "On the quality gaps to llm-compressor: both tools run the same GPTQ as far as a line-by-line "
                  "reading of llm-compressor 0.14 shows (min-max observer, symmetric scale absmax / ((2^b - 1) / 2), "
                  "levels -2^(b-1)..2^(b-1)-1, 'static' act-order = groups fitted once on the original W, the same "
                  "Hessian scaling 2/N sum x x^T, dead columns, damping 0.01 x mean diag, 128-column lazy blocks, "
                  "quantized outputs propagated block by block). Known differences: weightlab solves in float64 and "
                  "stores scales in fp16, llm-compressor solves in float32, and they accumulate H in a different "
                  "order (batches of 4 vs 1)."
                  + (" The 'spread of weightlab itself' lines show what the accumulation order alone does."
                     if any(r.get("calib_batch") for r in results) else "")
                  + f" Quality target met in {sum(q_ok)} of {len(q_ok)} pairs in this run"
                  + (f"; not met: {', '.join(q_miss)}. The cause of those gaps was not found beyond the differences "
                     "listed; they are reported, not tuned away." if q_miss else ".")]
    lines += ["", f"Whole benchmark run: {total_s / 60:.1f} min" + (f" (partial run: {note})" if note else "") +
              f". Reproduce: `{REPRO}` (`--quick`, `--only minilm|smollm2`, `--skip-lc`, `--skip-awq`, `--repeats N`, "
              "`--timing-pairs minilm,smollm2:4`, `--no-write`, `--keep DIR` then "
              f"`--render-only DIR`); llm-compressor's venv: `{LC_SETUP}`."]
    return "\n".join(lines)


def render_awq(results: list[dict], total_s: float, note: str) -> str:
    """The AWQ section: SmolLM2 4-bit, weightlab vs llm-compressor, with RTN (and the dense model) of the same run."""
    rounds = pair_rounds([r for r in results if r["method"] == "awq"])
    results = [r for r in results if r.get("repeat", 1) == 1]
    rs = [r for r in results if r["model"] == "smollm2"
          and (r["method"] == "dense" or (r["method"] in ("rtn", "awq") and r.get("bits") == 4))]
    rs = [r for r in rs if r["method"] != "rtn" or not r.get("calib_batch")]
    by = {(r["tool"], r["method"]): r for r in rs if r["method"] != "awq"}
    awq_wl = [r for r in rs if r["method"] == "awq" and r["tool"] == "weightlab"]
    wl = next((r for r in awq_wl if r.get("attn")), awq_wl[0] if awq_wl else None)
    spread = next((r for r in awq_wl if r is not wl), None)
    lc = next((r for r in rs if r["method"] == "awq" and r["tool"] == "llm-compressor"), None)
    wl_v = next((r["versions"] for r in rs if r["tool"] == "weightlab"), {})
    lc_v = next((r["versions"] for r in rs if r["tool"] == "llm-compressor"), {})
    lo, hi = CC.loadavg_range(rs)
    n = (wl or lc or {}).get("nsamples", CC.NSAMPLES)
    group = MODELS["smollm2"]["group"]
    lines = [f"Date: {C.today()}. Machine: {C.machine_line()}. " + C.load_sentence([lo, hi]) + " Compare tools within this run.",
             f"Versions: weightlab {C.package_version('weightlab')} in .venv (torch {wl_v.get('torch', 'n/a')}, "
             f"transformers {wl_v.get('transformers', 'n/a')}); llm-compressor {lc_v.get('llmcompressor', 'n/a')} in "
             f".venv-lc (torch {lc_v.get('torch', 'n/a')}, transformers {lc_v.get('transformers', 'n/a')}, "
             f"compressed-tensors {lc_v.get('compressed-tensors', 'n/a')}). torch threads per child: "
             f"{sorted({r.get('torch_threads') for r in rs}, key=str)} (the same for both tools).", "",
             f"Protocol: SmolLM2-135M as in the section above (fp32 weights of a dequantized Q4_1 GGUF; held-out "
             f"perplexity over 16,384 tokens), calibration **{n} x 512 tokens** (the first {n} windows of that "
             f"section's calibration ids, the same for both tools), 4-bit symmetric groups of {group} (llm-compressor's "
             f"W4A16 preset with group {group}; 576 columns), every Linear of the 30 blocks. weightlab = "
             f"`quantize(model, 'awq', 4, {group}, sym=True, scale_dtype='float32')`: AWQ smoothing with its "
             "defaults (duo scaling, 20 grid points, the Llama mappings), then RTN; scales in fp32 like "
             "llm-compressor's (weightlab's RTN row too), calibrated under llm-compressor's conditions: batches of "
             "1 window and eager attention (`use_eager_attention` in its calibration context; the model is "
             "evaluated with sdpa again). The row 'weightlab defaults' calibrates in batches of 4 with sdpa "
             "attention. llm-compressor = "
             f"`oneshot(recipe=[AWQModifier(), QuantizationModifier(W4 symmetric group {group}, ignore lm_head)], "
             "batch_size=1, shuffle off)` (AWQModifier's defaults: the same), its weights then set to their "
             "fake-quantized values; on a CPU-only torch its cache pinning is turned off (0.14.0.1 calls "
             "`pin_memory()`, which raises without an accelerator; pinning only speeds host-to-device copies). Both skip v_proj -> o_proj (grouped-query attention: v_proj has 192 outputs, "
             "o_proj 576 inputs), so 3 mappings x 30 blocks are smoothed. **quant s** = the `quantize(...)` / "
             "`oneshot(...)` call (wall; CPU seconds in brackets); **wall** = the whole child, each run its own "
             f"process; the weightlab/llm-compressor pair runs {len(rounds.get(('smollm2', 'awq', 4), [])) or 1} "
             "round(s), each flipping which tool goes first (round 1 in the table; later rounds time the quantize "
             "call only), the other runs once."
             + ("" if ("weightlab", "dense") in by else " The fp32 perplexity is the section above's (not re-run)."),
             ""]
    rows = []
    for r in rs:
        label = {"dense": "fp32", "rtn": "RTN 4-bit", "awq": "AWQ + RTN 4-bit"}[r["method"]]
        o = lc if r is wl else None
        tool = r["tool"] + (" (defaults)" if r is spread else "")
        rows.append([label, tool, f"**{_qfmt(_qnum(r), 'smollm2')}**", fmt(r.get("bits_per_weight"), 3),
                     f"{fmt(r.get('quant_s'))} ({fmt(r.get('quant_cpu_s'))})" if "quant_s" in r else "-",
                     fmt(r["wall_s"]), fmt(r["peak_rss_mib"], 0), str(r.get("check", {}).get("max_levels_per_group", "-")),
                     C.fmt_ratio(r["quant_s"] / o["quant_s"] if o else None)])
    lines += [C.md_table(["method", "tool", "PPL", "bits/weight", "quant s (CPU s)", "wall s", "peak RSS MiB", "levels",
                          "time ratio wl/lc (round 1)"], rows), ""]
    if wl and wl.get("awq"):
        a = wl["awq"]
        lines.append(f"weightlab's grid search: {a['mappings']} mappings smoothed ({a['skipped']} skipped), output "
                     f"error of the chosen scales {a['error_vs_rtn']:.3f}x plain RTN's on the calibration data "
                     f"(mean over mappings); chosen ratios from {min(a['ratios']):.2f} to {max(a['ratios']):.2f}.")
        lines.append("")
    lines.append(f"Targets and verdicts: weightlab AWQ's PPL <= llm-compressor's x {PPL_SLACK} and no slower (the "
                 "quantize call, wall); AWQ better than RTN at the same grid.")
    if wl and lc:
        a, b = _qnum(wl), _qnum(lc)
        lines.append(f"- smollm2 AWQ 4-bit: {a:.3f} vs {b:.3f}: **{'met' if a <= b * PPL_SLACK else 'NOT met'}**; "
                     + time_verdict(rounds[("smollm2", "awq", 4)]))
    if spread and wl:
        lines.append(f"- weightlab's defaults (batches of 4, sdpa attention; the same windows, activations that differ "
                     f"in the last bits): {_qnum(spread):.3f} vs {_qnum(wl):.3f}"
                     + (f"; its quantize call {spread['quant_s']:.1f} s = {spread['quant_s'] / lc['quant_s']:.2f}x "
                        "llm-compressor's round 1 (one run, other settings than the pair)" if lc and "quant_s" in spread else ""))
    rtn = by.get(("weightlab", "rtn"))
    for r in (wl, lc):
        if r and rtn:
            lines.append(f"- {r['tool']} AWQ {_qnum(r):.3f} vs RTN {_qnum(rtn):.3f}: AWQ "
                         f"**{'better' if _qnum(r) < _qnum(rtn) else 'NOT better'}**")
    lines += ["", "Why the conditions matter (compress/awq.py): in a symmetric grid the largest |w| of every group "
              "sits exactly on a rounding tie (|w| / scale = 7.5 at 4 bits), so last-bit differences in the scales "
              "or the activations flip those codes and then the grid choices. weightlab's AWQ therefore keeps "
              "llm-compressor's dtypes (float32 sums of |x|, float64 w_mean, float32 loss sums) and divides "
              "w / scale in float32 as compressed-tensors does (weightlab's plain RTN divides in float64: on this "
              "model it differs from llm-compressor's RTN on 0.33 % of the weights, all ties). On a 3-block Llama "
              "with eager attention every grid loss and the final weights equal llm-compressor's bit for bit.",
              "", f"Whole benchmark run: {total_s / 60:.1f} min" + (f" ({note})" if note else "") +
              f". Reproduce: `{REPRO} --awq-only` (`--awq-nsamples N`, `--repeats N`, `--keep DIR` then `--render-only DIR`); "
              f"llm-compressor's venv: `{LC_SETUP}`."]
    return "\n".join(lines)


def _method_verdicts(by: dict, mname: str) -> list[str]:
    """The issue's claims among weightlab's own methods: GPTQ beats RTN; EoRA beats SVD at equal rank."""
    out = []
    better = (lambda a, b: a > b) if mname == "minilm" else (lambda a, b: a < b)
    for bits in BITS:
        g, r = by.get((mname, "weightlab", "gptq", bits, None)), by.get((mname, "weightlab", "rtn", bits, None))
        if g and r:
            a, b = _qnum(g), _qnum(r)
            out.append(f"- {mname} {bits}-bit: GPTQ {_qfmt(a, mname)} vs RTN {_qfmt(b, mname)}: GPTQ "
                       f"**{'better' if better(a, b) else 'NOT better'}**")
    ch = by.get((mname, "weightlab", "chain", 4, None))
    if ch:
        for rank in RANKS:
            e, s = ch["stages"].get(f"eora{rank}"), ch["stages"].get(f"svd{rank}")
            if e and s:
                a, b = _qnum(e), _qnum(s)
                out.append(f"- {mname} rank {rank}: EoRA {_qfmt(a, mname)} vs SVD {_qfmt(b, mname)} (compressed "
                           f"{_qfmt(_qnum(ch), mname)}): EoRA **{'better' if better(a, b) else 'NOT better'}**")
    return out


def _qnum(r: dict) -> float:
    q = r["quality"]
    return q["ppl"] if "ppl" in q else q["cos"]


def _qfmt(x: float, mname: str) -> str:
    return f"{x:.4f}" if mname == "minilm" else f"{x:.3f}"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
