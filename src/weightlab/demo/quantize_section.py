"""Demo section: RTN 4-bit (group 64) quantization of SmolLM2, then EoRA rank-16 compensation."""
from __future__ import annotations

import time


def quantize_section(ctx):
    import copy

    from ..compress import compensate as _c, rtn as _r  # noqa: F401  (register)
    from ..compress.compensate import compensate
    from ..compress.quantize import quantize
    from ..engine.evaluate import perplexity
    from ..io.hf import load_causal_lm

    t0 = time.perf_counter()
    model, tok = load_causal_lm(ctx.model_path)
    original = copy.deepcopy(model)
    text = ctx.heldout()

    def ppl(m):
        return perplexity(m, tok, text, max_tokens=ctx.eval_tokens)["perplexity"]

    dense = ctx.cache.get("dense_ppl") or ppl(model)
    rep = quantize(model, "rtn", 4, 64)
    q_ppl = ppl(model)
    crep = compensate(model, original, "eora", 16, calib="wiki", tokenizer=tok, nsamples=8, seqlen=256)
    e_ppl = ppl(model)
    del original
    res = {"dense_ppl": dense, "rtn4_g64_ppl": q_ppl, "eora16_ppl": e_ppl,
           "bits_per_weight": rep.bits_per_weight, "adapter_params": crep.as_dict()["adapter_params"],
           "seconds": round(time.perf_counter() - t0, 1)}
    text_md = (f"RTN 4-bit, group 64 ({rep.bits_per_weight:.3f} bits/weight incl. fp16 scales and zero points, "
               f"{len(rep.layers)} block linears): perplexity {dense:.3f} -> **{q_ppl:.3f}**; EoRA rank 16 "
               f"(8 calibration windows of 256 tokens, {res['adapter_params']:,} extra parameters, merged): "
               f"**{e_ppl:.3f}**. SmolLM2's weights come from a 4-bit GGUF, so compare the stages with each other.")
    return res, text_md
