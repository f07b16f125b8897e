"""SLTrain vs dense vs low-rank pretraining of a small zoo model (MNIST-1D MLP), equal training.

    .venv/bin/python benchmarks/sltrain_pretrain.py            # 3 seeds, ~2-4 min on 2 cores
    .venv/bin/python benchmarks/sltrain_pretrain.py --seeds 1 --no-write

The zoo's MLP (40 -> 256 -> 256 -> 10) is trained from scratch on the zoo's MNIST-1D with the
zoo's default recipe (Adam, the zoo's epochs and learning rate, batch 64); only the middle
256 x 256 layer changes between runs:
  dense                     nn.Linear
  SLTrain r, delta          W = (alpha/r) B A + S, S on a fixed random support of delta * 256^2 entries
  low-rank r                the same layer with delta = 0 (W = (alpha/r) B A)
  low-rank, equal params    the low rank whose parameter count is closest to SLTrain's
Held-out accuracy on the zoo's MNIST-1D test split, mean and std over seeds (the seed sets the
init, the support and the batch order). Ratios are the middle layer's trainable parameters.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "Adapt II: SLTrain vs dense vs low-rank pretraining (MNIST-1D MLP)"
HIDDEN = (256, 256)
MIDDLE = "body.2"  # the 256 x 256 Linear of MLP.body


def build(variant: dict, ds, seed: int):
    from weightlab.adapt import sltrain
    from weightlab.zoo.classifiers import build_model

    model = build_model("mlp", ds, seed, hidden=HIDDEN)
    if variant["kind"] != "dense":
        sltrain.convert(model, targets=[MIDDLE], r=variant["r"], delta=variant["delta"], alpha=variant["alpha"],
                        seed=seed)
    return model


def middle_params(model) -> int:
    return sum(p.numel() for p in model.get_submodule(MIDDLE).parameters() if p.requires_grad)


def run(args) -> str:
    import torch

    from weightlab.zoo.classifiers import TRAINING, accuracy, train_classifier
    from weightlab.zoo.tabular import mnist1d

    torch.set_num_threads(1)
    ds = mnist1d()
    epochs, lr = TRAINING["mlp"]["epochs"], TRAINING["mlp"]["lr"]
    r, delta, alpha = args.rank, args.delta, args.alpha
    sl_params = r * 512 + int(delta * 256 * 256) + 256
    r_eq = max(1, round((sl_params - 256) / 512))
    variants = [
        ("dense", {"kind": "dense"}),
        (f"SLTrain r={r}, delta={delta}", {"kind": "sl", "r": r, "delta": delta, "alpha": alpha}),
        (f"low-rank r={r}", {"kind": "sl", "r": r, "delta": 0.0, "alpha": alpha}),
        (f"low-rank r={r_eq} (equal params)", {"kind": "sl", "r": r_eq, "delta": 0.0, "alpha": alpha}),
    ]
    rows, accs = [], {}
    for name, v in variants:
        got, secs, count = [], [], None
        for seed in range(args.seeds):
            model = build(v, ds, seed)
            count = middle_params(model)
            t0 = time.perf_counter()
            train_classifier(model, ds, epochs=epochs, lr=lr, seed=seed)
            secs.append(time.perf_counter() - t0)
            got.append(accuracy(model, ds.x_test, ds.y_test))
            C.log(f"{name} seed {seed}: {got[-1]:.4f}")
        accs[name] = got
        sd = statistics.stdev(got) if len(got) > 1 else 0.0
        rows.append([name, f"{count:,}", f"{count / (256 * 256 + 256):.3f}", f"{statistics.mean(got):.4f} ± {sd:.4f}",
                     " / ".join(f"{a:.3f}" for a in got), f"{statistics.mean(secs):.1f}"])
    names = [n for n, _ in variants]
    sl, lr_same, lr_eq = (statistics.mean(accs[n]) for n in names[1:])
    dense = statistics.mean(accs[names[0]])

    def noise(a: str, b: str) -> float:  # the larger seed std of the two rows
        return max(statistics.stdev(accs[a]) if len(accs[a]) > 1 else 0.0,
                   statistics.stdev(accs[b]) if len(accs[b]) > 1 else 0.0)

    def says(diff: float, a: str, b: str) -> str:
        if abs(diff) <= noise(a, b):
            return "within the seed-to-seed spread: no difference shown"
        return "SLTrain better" if diff > 0 else "SLTrain worse"

    verdict = [
        f"- SLTrain vs low-rank at the same rank: {sl - lr_same:+.4f} accuracy ({says(sl - lr_same, names[1], names[2])}).",
        f"- SLTrain vs low-rank at equal parameters: {sl - lr_eq:+.4f} ({says(sl - lr_eq, names[1], names[3])}); "
        "the paper's claim is that the sparse part buys more than the same parameters spent on rank.",
        f"- SLTrain vs dense: {sl - dense:+.4f} with {sl_params / (256 * 256 + 256):.1%} of the layer's parameters.",
    ]
    return "\n".join([
        f"Date: {C.today()}. Machine: {C.machine_line()}. torch {C.package_version('torch')}, "
        f"weightlab {C.package_version('weightlab')}.",
        "",
        f"The zoo's MLP 40-256-256-10 trained from scratch on MNIST-1D ({len(ds.y_train)} train, {len(ds.y_test)} "
        f"test), Adam lr {lr}, {epochs} epochs, batch 64, one thread; only the middle 256x256 layer differs. "
        f"SLTrain alpha {alpha} (s = alpha/r). Seeds 0..{args.seeds - 1} (init, support, batch order).",
        "",
        C.md_table(["middle layer", "trainable params", "share of dense", "test accuracy (mean ± std)", "per seed",
                    "train s"], rows),
        "",
        *verdict,
        "",
        "Reproduce: `.venv/bin/python benchmarks/sltrain_pretrain.py` (`--seeds`, `--rank`, `--delta`, `--alpha`).",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--delta", type=float, default=0.03)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    body = run(args)
    print(body)
    if not args.no_write:
        C.write_section(SECTION, body)
        C.log(f"wrote {C.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
