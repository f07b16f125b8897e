"""Run by llm-compressor's own interpreter (.venv-lc) from tests/test_w8a8_parity.py: quantize the tiny Llama in
SRC with llm-compressor 0.14 recipes and save each result compressed (OUT/<scheme>). Standard library + its venv only.

    .venv-lc/bin/python tests/_lc_w8a8.py SRC OUT
"""
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import SmoothQuantModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
SRC, OUT = sys.argv[1], sys.argv[2]
IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))  # test_awq.IDS
INT_W = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
INT_STATIC = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
KV = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
      "observer": "static_minmax"}


def recipes():
    return {
        "w8a8_sq": [SmoothQuantModifier(smoothing_strength=0.5),
                    QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "w8a8_static_sq": [SmoothQuantModifier(smoothing_strength=0.5),  # default observer: minmax (moving average)
                           QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": INT_W,
                                                                     "input_activations": INT_STATIC}},
                                                ignore=["lm_head"])],
        "fp8": [QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"])],
        "fp8_dynamic_kv": [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"],
                                                kv_cache_scheme=KV)],
    }


tok = AutoTokenizer.from_pretrained(SRC)
ds = Dataset.from_dict({"input_ids": IDS.tolist()})
for name, recipe in recipes().items():
    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=8, max_seq_length=32,
            shuffle_calibration_samples=False, batch_size=1)
    model.save_pretrained(f"{OUT}/{name}", save_compressed=True)
    print("done", name, flush=True)
