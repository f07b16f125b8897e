"""Recipe step: export the model as the previous steps left it (GGUF for llama.cpp, or a dense HF folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register


class ExportStepConfig(MethodConfig):
    format: Literal["gguf", "hf"] = "gguf"
    type: str = Field("q8_0", description="GGUF type: f16, q8_0, q4_0, q4_k_m")
    name: str | None = Field(None, description="file or folder name inside the recipe's output "
                                               "(default model-TYPE.gguf / model-hf)")
    dtype: str | None = Field(None, description="hf: store floating tensors in this dtype")
    pre: str | None = Field(None, description="gguf: llama.cpp pre-tokenizer name (found for known vocabularies)")


@register("compress", "export", kind="report", config=ExportStepConfig, regime=Regime.STREAMING,
          paper="(deployment formats)", summary="recipe step: write the model as GGUF (f16, q8_0, q4_0, q4_k_m) "
                                                "or a dense HF folder into the recipe's output", workdir=True)
def export_step(source, cfg: ExportStepConfig, workdir: Path, show_progress: bool | None = None) -> dict:
    from ..engine.source import root_path

    path = root_path(source)
    if path is None or getattr(source, "inner", None) is not None:
        raise ConfigError("the export step needs the model written to a folder (the recipe runner does this)")
    name = cfg.name or (f"model-{cfg.type}.gguf" if cfg.format == "gguf" else "model-hf")
    if Path(name).name != name:
        raise ConfigError(f"export step: name '{name}' must be a plain file or folder name (no folders)")
    dest = workdir / name
    if cfg.format == "gguf":
        from ..io.gguf_export import export_gguf

        rep = export_gguf(path, dest, cfg.type, force=True, pre=cfg.pre).as_dict()
    else:
        from ..io.hf_export import export_hf

        rep = export_hf(path, dest, force=True, dtype=cfg.dtype)
    rep["path"] = name  # relative to the recipe's output, where the runner puts it
    return {**rep, "artifacts": {name: dest}}  # the runner moves artifacts into the output
