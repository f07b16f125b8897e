"""``weightlab tune`` (adapter fine-tuning) and ``weightlab adapter export|sum|extract`` (PEFT folders)."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from ..errors import ConfigError, OutputExistsError
from . import app
from ._common import console, device_option, emit_json, human, human_bytes, json_option

adapter_app = typer.Typer(help="Adapter folders: export to PEFT, sum orthogonal concept adapters, extract a LoRA "
                               "from a fine-tune.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


@app.command()
def tune(path: str = typer.Argument(..., help="causal-LM folder (HF) or zoo:NAME"),
         adapter: str = typer.Option("lora", "--method", "-m", "--adapter", "-a", help="an adapt method: lora, dora, adalora, ia3, vera, loha, lokr, oft, boft, pissa, sorsa, bone, bat, gradnormlorp, dsee, sara, sltrain, pst, orthogonal, compander, contracon (weightlab methods --family adapt)"),
         rank: int = typer.Option(16, "--rank", "-r", help="adapter rank, for the methods that have one"),
         data: str = typer.Option("wiki", "--data", help="wiki, FILE.txt, or FILE.jsonl (text or prompt/response)"),
         steps: int = typer.Option(100, "--steps"), lr: float = typer.Option(2e-4, "--lr"),
         batch_size: int = typer.Option(4, "--batch-size"), seqlen: int = typer.Option(256, "--seqlen"),
         targets: str = typer.Option(None, "--targets", help="comma-separated name suffixes, 'all-linear', "
                                                             "or re:REGEX (default: attention + MLP projections)"),
         eval_every: int = typer.Option(None, "--eval-every"), seed: int = typer.Option(0, "--seed"),
         param: list[str] = typer.Option(None, "--param", "-p", help="adapter parameter KEY=VALUE"),
         reweight: str = typer.Option(None, "--reweight", help="per-sample loss weighting from the data family: "
                                      "linupper, quadratic, extremes (loss-reweight), dro, ldr-kl, aldr-kl"),
         reweight_param: list[str] = typer.Option(None, "--reweight-param",
                                                  help="loss-weighting parameter KEY=VALUE (e.g. temperature=0.4, "
                                                       "burn_in=0)"),
         save_every: int = typer.Option(None, "--save-every", help="checkpoint every N steps (default steps/4)"),
         no_merged: bool = typer.Option(False, "--no-merged", help="skip the merged-model export"),
         dequantize_base: bool = typer.Option(False, "--dequantize-base", help="load a compressed-tensors base "
                                              "dense (fp32) instead of keeping its packed 4/8-bit Linears"),
         out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force"),
         no_resume: bool = typer.Option(False, "--no-resume", help="ignore OUT/checkpoint"),
         device: str = device_option()) -> None:
    """Fine-tune a causal LM with an adapter; held-out loss during training, checkpoint/resume, merged export.

    Multi-GPU: accelerate launch -m weightlab tune ... (each process trains on its slice of the batch
    on its local rank's GPU; --device cpu makes them CPU processes). Weights train in fp32.
    """

    from ..adapt.training import tune as run_tune
    from ..io.atomic import check_not_input
    from ..io.refs import resolve_model

    from ..engine.device import resolve_device

    resolve_device(device)  # an unavailable device is one error line before any work
    src = resolve_model(path)
    check_not_input(Path(out), [src])
    o = Path(out)
    if o.exists() and not (o / "checkpoint").exists() and any(o.iterdir()) and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")

    from ._compress import parse_params

    params = parse_params(param)
    rw_params = parse_params(reweight_param, "--reweight-param")
    if rw_params and not reweight:
        raise ConfigError("--reweight-param needs --reweight NAME")
    tg = None
    if targets:
        tg = targets[3:] if targets.startswith("re:") else ("all-linear" if targets == "all-linear"
                                                             else [t.strip() for t in targets.split(",")])
    from .adapt_qbase import load_tune_base

    model, tok, note = load_tune_base(src, dequantize_base)
    if note:
        console.print(note, highlight=False)

    def on_eval(step, loss):
        console.print(f"step {step:>5}: held-out loss {loss:.4f}")

    res = run_tune(model, tok, adapter, data, rank=rank, targets=tg, steps=steps, lr=lr, batch_size=batch_size,
                   seqlen=seqlen, eval_every=eval_every, out=o, resume=not no_resume, seed=seed,
                   merged=not no_merged, on_eval=on_eval, method_config=params, save_every=save_every,
                   loss_weighting=reweight, loss_weighting_config=rw_params, device=device)
    if res.get("process_index", 0):
        return
    rw = f", {res['loss_weighting']['name']} loss weighting" if reweight else ""
    console.print(f"[green]tuned[/] {adapter} ({res['trainable']:,} trainable) for {steps} steps in "
                  f"{res['seconds']:.1f} s{rw}: held-out loss {res['heldout_before']:.4f} -> {res['heldout_after']:.4f}"
                  f" -> {out}/adapter" + ("" if no_merged else f", {out}/merged"))


@adapter_app.command("export")
def export(path: str = typer.Argument(..., help="weightlab adapter folder"),
           fmt: str = typer.Option("peft", "--format", help="peft"),
           base: str = typer.Option(None, "--base", help="base model (needed for bat / gradnormlorp)"),
           svd_rank: int = typer.Option(None, "--svd-rank", help="SVD rank for adapters that are not LoRA-shaped"),
           out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Write a weightlab adapter folder as a PEFT folder (adapter_model.safetensors + adapter_config.json).

    LoRA-shaped methods become PEFT LoRA (DoRA: use_dora); (IA)^3, VeRA, LoHa and LoKr their own PEFT types."""
    from ..adapt import export_folder_peft

    if fmt != "peft":
        raise ConfigError(f"unknown export format '{fmt}'; supported: peft")
    export_folder_peft(path, out, base=base, svd_rank=svd_rank, force=force)
    conf = json.loads((Path(out) / "adapter_config.json").read_text())
    kind = conf["peft_type"] + (f" r={conf['r']}" if "r" in conf else "")
    console.print(f"[green]exported[/] {path} -> {out} (PEFT {kind}, {len(conf['target_modules'])} layers)")


@adapter_app.command("sum")
def sum_(paths: list[str] = typer.Argument(..., help="orthogonal concept adapter folders (two or more)"),
         out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Sum independently trained orthogonal-adaptation concept adapters into one adapter folder."""
    from ..adapt.orthogonal import orthogonal_sum

    orthogonal_sum(paths, out, force=force)
    conf = json.loads((Path(out) / "adapter_config.json").read_text())
    console.print(f"[green]summed[/] {len(paths)} concept adapters (concepts {conf['config']['concepts']}, "
                  f"rank {conf['config']['r']}) -> {out}")


@adapter_app.command("extract")
def extract(base: str = typer.Argument(..., help="base model: HF folder, .safetensors file or zoo:NAME"),
            finetuned: str = typer.Argument(..., help="fine-tuned model with the base's tensor names and shapes"),
            out: str = typer.Option(..., "--out", "-o", help="PEFT LoRA folder to write"),
            rank: int = typer.Option(None, "--rank", "-r", help="fixed rank per module (mergekit's --max-rank); "
                                                                "the default rule: --max-rank, else 128"),
            energy: float = typer.Option(None, "--energy", help="per module, the smallest rank whose singular "
                                                                "values hold this share of the change's energy "
                                                                "(squared Frobenius norm), e.g. 0.9"),
            sv_threshold: float = typer.Option(None, "--sv-threshold", help="keep the singular values above this "
                                                                            "fraction of the largest, e.g. 0.01"),
            max_rank: int = typer.Option(None, "--max-rank", help="upper bound on every module's rank"),
            sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="also drop singular values <= this "
                                                                       "(absolute, as mergekit)"),
            target_modules: str = typer.Option(None, "--target-modules", help="regex over the whole module name, "
                                               "as PEFT (e.g. '.*(q_proj|v_proj)'): the matrices factored "
                                               "(default: every Linear/Conv1D)"),
            embeddings: str = typer.Option("save", "--embeddings", help="changed embeddings and output head: save "
                                           "(in full, modules_to_save; mergekit's default), lora, or skip"),
            undecomposable: str = typer.Option("save", "--undecomposable", help="changed norms and other "
                                               "tensors: save (the module in full) or skip"),
            biases: str = typer.Option("lora", "--biases", help="changed biases of factored modules: lora "
                                       "(PEFT lora_B.bias) or skip"),
            svd: str = typer.Option("auto", "--svd", help="full (torch.linalg.svd, exact), lowrank (randomized, "
                                    "needs --rank or --max-rank) or auto (lowrank for a small bounded rank of "
                                    "a matrix whose shorter side is >= 1024)"),
            distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale",
                                                  help="sqrt(S) on both factors (mergekit's default), else S on A"),
            dtype: str = typer.Option(None, "--dtype", help="dtype of the written tensors (default: the "
                                                            "fine-tune's): float32, bfloat16, float16"),
            device: str = device_option(),
            force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
            json_out: str = json_option("the extraction report")) -> None:
    """Extract a LoRA from a fine-tune: the low-rank part of (FINETUNED - BASE) per layer, as a PEFT adapter.

    Like mergekit-extract-lora; streams one tensor pair at a time. The folder loads with
    peft.PeftModel.from_pretrained(base_model, OUT).
    """
    from ..adapt.extract import extract_lora
    from ..engine.device import resolve_device

    resolve_device(device)  # an unavailable device is one error line before any work
    res = extract_lora(base, finetuned, out, rank=rank, energy=energy, sv_threshold=sv_threshold,
                       sv_epsilon=sv_epsilon, max_rank=max_rank, target_modules=target_modules, embeddings=embeddings,
                       undecomposable=undecomposable, biases=biases, svd=svd, distribute_scale=distribute_scale,
                       dtype=dtype, device=device, force=force)
    rep = res.as_dict()
    if emit_json(rep, json_out):
        return
    ranks = sorted(m["rank"] for m in res.modules)
    worst = max(res.modules, key=lambda m: m["rel_error"])
    console.print(f"[green]extracted[/] a LoRA ({res.rule}) of {len(ranks)} modules, ranks {ranks[0]}-{ranks[-1]} "
                  f"(median {ranks[len(ranks) // 2]}), {human(res.params)} parameters ({human_bytes(res.bytes)}) "
                  f"-> {out}", highlight=False)
    console.print(f"  relative error {res.rel_error:.4g} overall, at most {worst['rel_error']:.4g} "
                  f"({escape(worst['name'])}); {res.unchanged} tensors unchanged; {res.seconds:.1f} s on {res.device}",
                  highlight=False)
    for w in res.warnings:
        console.print(f"  [yellow]warning:[/] {escape(w)}", highlight=False)


from . import adapt_qbase  # noqa: E402,F401  (weightlab adapter fold)
from . import adapt_combine  # noqa: E402,F401  (weightlab adapter combine)
