"""``weightlab adapter combine``: a weighted combination of LoRA adapter folders (PEFT's add_weighted_adapter)."""
from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError
from ._common import check_outputs, console, emit_json, json_option
from .adapt import adapter_app


@adapter_app.command("combine")
def combine(paths: list[str] = typer.Argument(..., help="LoRA adapter folders (PEFT or weightlab), one or more"),
            weights: str = typer.Option(..., "--weights", help="one weight per adapter, comma-separated, "
                                                                      "e.g. 0.7,0.3 (negative subtracts)"),
            combination: str = typer.Option("svd", "--combination", "-c",
                                            help="svd (rank-R SVD of the weighted sum of the updates), cat "
                                                 "(concatenated factors: exact, rank = sum of ranks) or linear "
                                                 "(sqrt-weighted factor sums, equal ranks; PEFT's rough rule)"),
            svd_rank: int = typer.Option(None, "--svd-rank", help="rank of the svd result (default: the "
                                                                  "largest input rank)"),
            svd_clamp: float = typer.Option(None, "--svd-clamp", help="clamp the svd factors to this quantile "
                                                                      "of their entries (PEFT's svd_clamp)"),
            fmt: str = typer.Option(None, "--format", help="peft or weightlab (default: the first input's)"),
            out: str = typer.Option(..., "--out", "-o", help="adapter folder to write"),
            force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
            json_out: str = json_option("the combination report")) -> None:
    """Combine LoRA adapters into one: PEFT's add_weighted_adapter on folders, no base model needed.

    The result is a LoRA with r = lora_alpha = R (PEFT's convention); PEFT loads a PEFT-format output
    with PeftModel.from_pretrained(base, OUT).
    """
    from ..adapt.combine import combine_folders

    try:
        ws = [float(w) for w in weights.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--weights {weights!r}: comma-separated numbers, one per adapter") from None
    if len(ws) != len(paths):
        raise ConfigError(f"--weights has {len(ws)} values for {len(paths)} adapters")
    check_outputs([json_out] if json_out else [], paths, force)
    rep = combine_folders([Path(p) for p in paths], ws, out, combination=combination, svd_rank=svd_rank,
                          svd_clamp=svd_clamp, fmt=fmt, force=force)
    rep = {**rep, "inputs": list(paths), "out": out}
    if emit_json(rep, json_out):
        return
    console.print(f"[green]combined[/] {len(paths)} adapters ({rep['combination']}, weights "
                  f"{','.join(f'{w:g}' for w in ws)}) into a rank-{rep['rank']} LoRA of {rep['layers']} layers "
                  f"-> {out} ({rep['format']})", highlight=False)
