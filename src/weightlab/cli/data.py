"""`weightlab score-data`: one score per training sample, as a table (CSV / JSON / Parquet) and a histogram."""
from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.table import Table

from ..errors import ConfigError, OutputExistsError
from . import app
from ._common import console, device_option, emit_json, json_option

_TRAINED = ("el2n", "grand", "forgetting")


def _params(items: list[str] | None) -> dict:
    out = {}
    for kv in items or []:
        if "=" not in kv:
            raise ConfigError(f"--param expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _check_out(path: Path, force: bool, what: str) -> None:
    if path.is_dir():
        raise OutputExistsError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise OutputExistsError(f"{what} {path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder of {what} {path} does not exist")


@app.command("score-data")
def score_data(
    method: str = typer.Option(..., "--method", "-m", help="el2n, grand, forgetting or prototype"),
    dataset: str = typer.Option(..., "--dataset", "-d", help="digits, mnist1d, wine, breast_cancer, or a CSV file "
                                                             "of numeric feature columns plus a 'label' column; "
                                                             "prototype also takes a .txt file, one text per line"),
    out: Path = typer.Option(..., "--out", "-o", help="score table: .csv, .json or .parquet (Parquet needs pyarrow)"),
    runs: int = typer.Option(None, "--runs", help="independent training runs to average (el2n, grand, forgetting; "
                                                  "default 5)"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs before scoring (default: el2n/grand 2, "
                                                      "forgetting 20)"),
    seed: int = typer.Option(None, "--seed", help="base seed (run r uses seed + r)"),
    param: list[str] = typer.Option(None, "--param", "-p", help="method parameter KEY=VALUE (repeatable), "
                                                                "see `weightlab methods -f data`"),
    plot: Path = typer.Option(None, "--plot", help="also draw a histogram (.png/.svg/.pdf; needs matplotlib)"),
    keep: float = typer.Option(None, "--keep", help="add a 'kept' column: the subset of this fraction to keep"),
    policy: str = typer.Option("hard", "--policy", help="with --keep: hard (highest scores), easy, random, or auto "
                                                        "(hard when data is abundant, else easy)"),
    skip_hardest: float = typer.Option(0.0, "--skip-hardest", help="with --keep --policy hard: first drop this "
                                                                   "fraction of the very hardest (often mislabeled)"),
    class_balanced: bool = typer.Option(False, "--class-balanced", help="with --keep: apply the policy within "
                                                                          "each class (keeps the class balance)"),
    label_noise: float = typer.Option(None, "--label-noise", help="flip this fraction of labels before scoring "
                                                                  "(to test a score); adds a 'noisy' column and "
                                                                  "prints the AUROC for finding them"),
    force: bool = typer.Option(False, "--force", help="replace existing output files"),
    json_out: str = json_option("the summary"),
    device: str = device_option(),
) -> None:
    """Score every training sample (higher = harder / more likely mislabeled) and write a table.

    \b
    weightlab score-data --method el2n --dataset digits -o scores.csv --plot scores.png
    weightlab score-data -m forgetting -d my.csv -o scores.json --runs 3 --keep 0.7 --policy easy
    weightlab score-data -m prototype -d posts.txt -o scores.csv      # texts: MiniLM embeddings

    prototype embeds numeric data with a SimCLR encoder it trains on the samples (no labels);
    -p encoder=raw clusters the raw features instead (an ablation, not the paper's method).

    --device: where the scoring models train (el2n, grand, forgetting) or the float64 k-means runs
    (prototype; on MPS, which has no float64, auto uses the CPU). Scores are written from the CPU.
    """
    from ..data import SCORE_METHODS, inject_label_noise, load_scoring_data, score_dataset
    from ..data.table import FORMATS, POLICIES, pyplot
    from ..tensor.sample_scores import auroc

    if method not in SCORE_METHODS:
        import difflib

        close = difflib.get_close_matches(method, SCORE_METHODS, n=1)
        raise ConfigError(f"unknown score '{method}'." + (f" Did you mean '{close[0]}'?" if close else "")
                          + f" Scores: {', '.join(SCORE_METHODS)}")
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"unknown output format '{out.suffix}' for {out}; use .csv, .json or .parquet")
    if policy not in POLICIES:
        raise ConfigError(f"unknown --policy {policy!r}; valid: {', '.join(POLICIES)}")
    from ..engine.device import resolve_device

    resolve_device(device)  # an unavailable device is one error line before any work
    params = _params(param)
    for flag, key, value in (("--runs", "runs", runs), ("--epochs", "epochs", epochs), ("--seed", "seed", seed)):
        if value is None:
            continue
        if method not in _TRAINED and key != "seed":
            raise ConfigError(f"{flag} does not apply to {method} (it trains no model)")
        params[key] = value
    # fail before the (possibly long) scoring, not after it
    _check_out(out, force, "output")
    if plot is not None:
        _check_out(plot, force, "plot")
        pyplot()
    if out.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            try:
                import pandas  # noqa: F401
            except ImportError:
                from ..errors import MissingDependencyError

                raise MissingDependencyError("pyarrow", "Writing scores as Parquet") from None

    if method == "prototype" and dataset.lower().endswith(".txt"):
        if label_noise is not None:
            raise ConfigError("--label-noise needs labels; a .txt file of texts has none")
        data = dataset  # texts, one per line: data/prototype embeds them with MiniLM
    else:
        data = load_scoring_data(dataset)
    noisy = None
    if label_noise is not None:
        y, noisy = inject_label_noise(data.y, label_noise, data.num_classes, seed=params.get("seed", 0))
        data = data.with_labels(y)
    table = score_dataset(method, data, device=device, **params)
    if noisy is not None:
        table.extra["noisy"] = noisy
    kept = None
    if keep is not None:
        kept = table.add_kept_column(keep, policy, skip_hardest=skip_hardest, seed=params.get("seed", 0),
                                     class_balanced=class_balanced)
    table.save(out, force=force)
    if plot is not None:
        table.plot(plot, force=force, highlight=noisy, highlight_label="flipped labels")

    summary = table.summary()
    summary["output"] = str(out)
    if plot is not None:
        summary["plot"] = str(plot)
    if noisy is not None:
        summary["label_noise"] = label_noise
        summary["auroc_noisy"] = auroc(table.scores, noisy)
    if kept is not None:
        summary["kept"] = int(kept.sum())
    if emit_json(summary, json_out):
        return
    t = Table(show_header=False, box=None)
    t.add_row("method", f"{method} on {summary['dataset']} ({summary['samples']} samples, {summary['seconds']} s)")
    if "median" in summary:
        t.add_row("score", f"min {summary['min']:.4g}, median {summary['median']:.4g}, mean {summary['mean']:.4g}, "
                           f"max {summary['max']:.4g}")
    if summary["nonfinite"]:
        t.add_row("never learned", f"{summary['nonfinite']} samples (score inf)")
    hardest = sorted(table.rows(), key=lambda r: r["rank"])[:5]
    t.add_row("hardest ids", ", ".join(f"{r['id']} ({r['score']:.3g})" for r in hardest))
    if noisy is not None:
        t.add_row("flipped labels", f"{int(noisy.sum())} ({label_noise:.0%}); AUROC of the score for finding them: "
                                    f"{summary['auroc_noisy']:.3f}")
    if kept is not None:
        t.add_row("kept", f"{summary['kept']} of {len(table)} ({policy}"
                          + (", class-balanced)" if class_balanced else ")"))
    t.add_row("wrote", str(out) + (f", {plot}" if plot is not None else ""))
    console.print(t)
