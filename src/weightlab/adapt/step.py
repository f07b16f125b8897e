"""Recipe step: train an adapter on the model as it is, then fold it into the weights."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..registry import MethodConfig, Regime, register


class TuneStepConfig(MethodConfig):
    method: str = "lora"
    data: str = Field("wiki", description="wiki, a .txt file, or .jsonl (text, or prompt/response pairs)")
    rank: int | None = 16
    steps: int = Field(100, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, gt=0)
    seqlen: int = Field(256, gt=1)
    seed: int = 0
    device: str | None = None
    params: dict = Field(default_factory=dict, description="the adapter method's own parameters")
    peft: bool = Field(False, description="also keep the adapter as a PEFT folder (output: step-NN-adapter-peft)")


@register("adapt", "tune", kind="transform", config=TuneStepConfig, regime=Regime.WHOLE_MODEL,
          paper="(recipe step training an adapter; see the adapters' papers)",
          summary="recipe step: fine-tune an adapter (LoRA, DoRA, PiSSA, ...), then fold it into the weights",
          workdir=True)
def tune_step(source, cfg: TuneStepConfig, workdir: Path, show_progress: bool | None = None):
    from ..engine.source import MappedSource, load_model_from
    from .api import fold
    from .training import tune

    model, tok = load_model_from(source)
    res = tune(model, tok, cfg.method, cfg.data, rank=cfg.rank, steps=cfg.steps, lr=cfg.lr,
               batch_size=cfg.batch_size, seqlen=cfg.seqlen, seed=cfg.seed, out=workdir / "tune", merged=False,
               progress=show_progress, method_config=cfg.params or None, device=cfg.device)
    artifacts = {"adapter": workdir / "tune" / "adapter"}
    if cfg.peft:
        from ..engine.source import root_path
        from .peft_io import export_folder_peft

        export_folder_peft(artifacts["adapter"], workdir / "adapter-peft", base=str(root_path(source)))
        artifacts["adapter-peft"] = workdir / "adapter-peft"
    fold(model)  # the adapter becomes part of the weights; later steps see a plain model
    sd = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    out = MappedSource(source, lambda name, t: sd[name].to(t.dtype) if name in sd else t)
    out.report = {k: v for k, v in res.items() if k != "history"}
    out.artifacts = artifacts
    return out
