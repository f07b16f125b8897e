"""Export any readable checkpoint (GGUF, GPTQ, AWQ, compressed-tensors, plain) as a dense HF folder."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .provenance import Provenance
from .reader import open_checkpoint
from .writer import CheckpointWriter

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def export_hf(src, out, *, force: bool = False, dtype: str | None = None) -> dict:
    """Write ``src`` dequantized into ``out`` (model.safetensors, config.json, tokenizer files)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    with open_checkpoint(src) as ck:
        is_gguf = ck.format == "gguf"
        prov = Provenance(method="io/export/hf", params={"source_format": (ck.quantization or {}).get("format",
                                                                                                     ck.format)},
                          inputs=[str(src)])
        if is_gguf and not (ck.config or {}).get("architectures"):
            raise ConfigError(f"GGUF architecture '{(ck.config or {}).get('model_type')}' has no Hugging Face class "
                              "here")
        # the writer takes config.json and the tokenizer from the GGUF itself (gguf_side_files)
        with CheckpointWriter(out, template=ck.path if is_gguf else ck.folder(), provenance=prov, inputs=[src],
                              force=force, dtype=dtype) as w:
            for name in ck.names():
                w.add(name, ck.get(name))
                ck.release(name)
        return {"path": str(out), "format": "hf", "source": ck.quantization or {"format": ck.format},
                "tensors": len(ck), "parameters": ck.num_parameters}


def gguf_side_files(path: Path) -> dict[str, bytes]:
    """config.json and (through transformers' GGUF tokenizer converter, if installed) the tokenizer
    files of a GGUF file, so a dense copy of it is a complete Hugging Face folder."""
    from .gguf_format import GGUFFile

    files = {"config.json": (json.dumps(GGUFFile(path).config, indent=2) + "\n").encode()}
    try:
        import transformers
    except ImportError:
        return files
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files.update({f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.name in _TOKENIZER_FILES})
    return files
