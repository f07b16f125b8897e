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
        # a GGUF's folder holds unrelated files: take nothing from it; a folder is its own template
        template = None if is_gguf else ck.folder()
        with CheckpointWriter(out, template=template, provenance=prov, inputs=[src], force=force, dtype=dtype) as w:
            if is_gguf:
                cfg = dict(ck.config or {})
                if not cfg.get("architectures"):
                    raise ConfigError(f"GGUF architecture '{cfg.get('model_type')}' has no Hugging Face class here")
                w.add_file("config.json", json.dumps(cfg, indent=2) + "\n")
                for fname, content in _gguf_tokenizer_files(ck.path).items():
                    w.add_file(fname, content)
            for name in ck.names():
                w.add(name, ck.get(name))
                ck.release(name)
        return {"path": str(out), "format": "hf", "source": ck.quantization or {"format": ck.format},
                "tensors": len(ck), "parameters": ck.num_parameters}


def _gguf_tokenizer_files(path: Path) -> dict[str, bytes]:
    """The GGUF's tokenizer as HF files, through transformers' GGUF tokenizer converter (if installed)."""
    try:
        import transformers
    except ImportError:
        return {}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.name in _TOKENIZER_FILES}
