"""Demo section: a brief LoRA fine-tune of SmolLM2 on Wikipedia text, showing the held-out loss drop."""
from __future__ import annotations

STEPS = 10
BATCH = 4
SEQLEN = 64


def adapt_section(ctx):
    """LoRA r=8 on q_proj/v_proj for 10 steps of 4 x 64 tokens; held-out loss before/after, merged check."""
    import torch

    from .. import adapt
    from ..io.refs import load_text
    from ..adapt.training import TextData, tune
    from ..io.hf import load_causal_lm

    model, tok = load_causal_lm(ctx.model_path)
    enc = lambda t: tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0]  # noqa: E731
    train = TextData(enc(load_text("wiki", "calib")[:200_000]), SEQLEN)  # a prefix: tokenizing all costs seconds
    held = TextData(enc(ctx.heldout()[:50_000]), SEQLEN)
    res = tune(model, tok, "lora", rank=8, targets=["q_proj", "v_proj"], steps=STEPS, lr=1e-3, batch_size=BATCH,
               seqlen=SEQLEN, eval_batches=2, eval_every=STEPS, train_data=train, heldout_data=held,
               progress=False, method_config={"alpha": 16, "seed": 0})
    x = held.eval_batches(1, 2)[0]["input_ids"]
    with torch.no_grad():
        y_ad = model(x).logits
        adapt.fold(model)
        y_m = model(x).logits
    merge_err = float((y_ad - y_m).abs().max())
    result = {"method": "lora", "rank": 8, "targets": ["q_proj", "v_proj"], "steps": STEPS,
              "tokens_per_step": BATCH * SEQLEN, "trainable": res["trainable"],
              "heldout_loss_before": round(res["heldout_before"], 4), "heldout_loss_after": round(res["heldout_after"], 4),
              "merged_max_abs_logit_diff": merge_err, "seconds": res["seconds"]}
    md = (f"**Adapt.** LoRA r=8 on `q_proj`/`v_proj` ({res['trainable']:,} trainable parameters), {STEPS} steps of "
          f"{BATCH}x{SEQLEN} Wikipedia tokens in {res['seconds']:.1f} s: held-out loss "
          f"{res['heldout_before']:.4f} -> {res['heldout_after']:.4f}. After `wl.adapt.fold` the plain model's "
          f"logits differ from the adapter forward by at most {merge_err:.1e} (float32).")
    return result, md
