from __future__ import annotations

import typer

from ..engine.source import StateDictSource
from ..engine.streaming import write_source
from ..io.provenance import Provenance
from ..io.reader import open_checkpoint
from ..io.refs import resolve_model
from . import app
from ._common import check_outputs, console, force_option

sig_app = typer.Typer(help="Robust Weight Signatures: extract, apply (compose), remove.", no_args_is_help=True)
app.add_typer(sig_app, name="signature")


def _sd(path: str):
    ck = open_checkpoint(resolve_model(path))
    return ck, {n: ck.get(n) for n in ck.names()}


@sig_app.command("extract")
def extract_cmd(base: str = typer.Option(..., "--base", help="the common initialization"),
                clean: str = typer.Option(..., "--clean", help="the clean fine-tuned model"),
                robust: str = typer.Option(..., "--robust", help="the robust fine-tuned model"),
                layers: int = typer.Option(7, "--layers", help="number of shallow layers (modules with weights)"),
                pattern: list[str] = typer.Option(None, "--pattern", help="only layers matching these globs"),
                levels: int = typer.Option(None, "--levels", help="quantize to this many levels (e.g. 256)"),
                quant: str = typer.Option("linear", "--quant", help="linear or log quantization"),
                out: str = typer.Option(..., "--out", "-o", help="signature file (.safetensors)"),
                force: bool = force_option()) -> None:
    """Extract a signature: robust minus base, with the clean fine-tuning direction projected out."""
    from ..merge import signatures

    check_outputs([out], [base, clean, robust], force)
    _, b = _sd(base)
    _, c = _sd(clean)
    _, r = _sd(robust)
    sig = signatures.extract(b, c, r, layers=layers, patterns=pattern or None)
    signatures.save(sig, out, levels=levels, mode=quant, metadata={"base": base, "clean": clean, "robust": robust})
    console.print(f"[green]signature[/] of {len(sig)} tensors -> {out}")


def _patch(model: str, sigs: list[str], alpha: float, out: str, force: bool, sign: int) -> None:
    from ..merge import signatures

    ck, sd = _sd(model)
    loaded = [signatures.load(s) for s in sigs]
    fn = signatures.apply if sign > 0 else signatures.remove
    patched = fn(sd, loaded, alpha)
    prov = Provenance(method="merge/robust-weight-signature/" + ("apply" if sign > 0 else "remove"),
                      params={"alpha": alpha, "signatures": sigs}, inputs=[model, *sigs])
    write_source(StateDictSource(patched, ck.config, ck.path), out, provenance=prov, inputs=[ck.path, *sigs],
                 force=force)
    console.print(f"[green]wrote[/] {out}")


@sig_app.command("apply")
def apply_cmd(model: str = typer.Argument(..., help="clean model"),
              sigs: list[str] = typer.Argument(..., help="signature files"),
              alpha: float = typer.Option(1.0, "--alpha", help="strength; shared as alpha/C over C signatures"),
              out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Patch a model with one or more signatures."""
    _patch(model, sigs, alpha, out, force, +1)


@sig_app.command("remove")
def remove_cmd(model: str = typer.Argument(..., help="patched model"),
               sigs: list[str] = typer.Argument(..., help="signature files"),
               alpha: float = typer.Option(1.0, "--alpha"),
               out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Subtract signatures that were applied with the same alpha."""
    _patch(model, sigs, alpha, out, force, -1)
