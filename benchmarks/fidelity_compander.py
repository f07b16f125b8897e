"""Fidelity row for Weight Compander (Cakaj, Mehnert, Yang, IJCNN 2023).

    nice .venv/bin/python benchmarks/fidelity_compander.py                      # both datasets, 5 seeds
    nice .venv/bin/python benchmarks/fidelity_compander.py --train-frac 0.25                     # low-data setting
    nice .venv/bin/python benchmarks/fidelity_compander.py --datasets digits --seeds 2 --epochs 5    # smoke
    .venv/bin/python benchmarks/fidelity_compander.py --tables /tmp/fidelity_compander.json          # re-render

The paper's claim: adding WC (w = a*arctan(v/b)) to standard regularization (weight decay, BN, dropout,
augmentation) raises test accuracy (CIFAR-10/100 ResNets +0.1 to +1.6 points, Tables II/III; learned a, b:
Table VI), bounds |w| by a*pi/2 from the first epoch and leaves fewer weights centred at zero (Fig. 3/4).
Offline stand-in: small conv nets with BN + dropout on sklearn digits (8x8) and MNIST-1D, trained with the
paper's CIFAR recipe scaled down: SGD momentum 0.9, lr 0.1 decayed x0.2 at 30/60/80% of the epochs, weight
decay 5e-4 (on w = Psi(v) for fixed a, b; on v and not a, b when learned), batch 128, random-shift
augmentation, a 9/1 train/validation split and the best-validation checkpoint evaluated on test (as the
paper). Arms: baseline; WC fixed (a, b) from a grid over {0.5, 0.7, 1.0}^2 on a separate seed (validation
accuracy); WC fixed at weightlab's default a = b = 0.7; learned fine WC (per-layer a, b from 0.5, 1.0).
Same seed = same init (WC starts at the same weights via Eq. 4), same batches and same augmentation.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from weightlab import adapt, zoo
from weightlab.adapt.compander import decay_penalty, param_groups

GRID = [(a, b) for a in (0.5, 0.7, 1.0) for b in (0.5, 0.7, 1.0)]
GRID_SEED = 100


class Net(nn.Module):
    """Conv-BN-ReLU x2 (+pool) then dropout and a linear head; 2-D convs (1 x k kernels for MNIST-1D)."""

    def __init__(self, shape: tuple[int, int], classes: int, k: tuple[int, int], c=(16, 32), p_drop=0.3):
        super().__init__()
        self.shape = shape
        pad = (k[0] // 2, k[1] // 2)
        self.features = nn.Sequential(
            nn.Conv2d(1, c[0], k, padding=pad, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(),
            nn.MaxPool2d((min(2, shape[0]), 2)),
            nn.Conv2d(c[0], c[1], k, padding=pad, bias=False), nn.BatchNorm2d(c[1]), nn.ReLU(),
            nn.AdaptiveAvgPool2d((min(2, shape[0]), 4)))
        self.drop = nn.Dropout(p_drop)
        self.head = nn.Linear(c[1] * min(2, shape[0]) * 4, classes)

    def forward(self, x):
        return self.head(self.drop(self.features(x.reshape(-1, 1, *self.shape)).flatten(1)))


SETTINGS = {"digits": dict(shape=(8, 8), k=(3, 3), shift=(1, 1), epochs=40),
            "mnist1d": dict(shape=(1, 40), k=(1, 5), shift=(0, 3), epochs=30)}


def load(name: str, train_frac: float = 1.0):
    ds = zoo.digits(seed=0) if name == "digits" else zoo.mnist1d()
    g = torch.Generator().manual_seed(0)  # the 9/1 train/validation split (paper Sec. IV-A), fixed
    perm = torch.randperm(len(ds.y_train), generator=g)
    n_val = len(perm) // 10
    va, tr = perm[:n_val], perm[n_val:]
    tr = tr[:max(1, round(train_frac * len(tr)))]  # a smaller training set: more overfitting to regularize
    return (ds.x_train[tr], ds.y_train[tr]), (ds.x_train[va], ds.y_train[va]), (ds.x_test, ds.y_test), ds.num_classes


def shift(x: torch.Tensor, shape, max_shift, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift pixels per axis, zero fill (the stand-in for crop/flip)."""
    img = x.reshape(-1, *shape)
    H, W = shape
    sy, sx = max_shift
    padded = F.pad(img, (sx, sx, sy, sy))
    dy = torch.randint(0, 2 * sy + 1, (len(x),), generator=g)
    dx = torch.randint(0, 2 * sx + 1, (len(x),), generator=g)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(-1, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(-1, H, W)
    out = padded[torch.arange(len(x))[:, None, None], rows, cols]
    return out.reshape(len(x), -1)


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def weights(model) -> list[torch.Tensor]:
    """The effective conv/linear weights (Psi(V) for WC layers), first conv first."""
    out, inner = [], {id(m.base_layer) for m in model.modules() if isinstance(m, adapt.AdapterLayer)}
    for m in model.modules():
        if isinstance(m, adapt.AdapterLayer):
            out.append(m.method.weight(m).detach().flatten())
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inner:
            out.append(m.weight.detach().flatten())
    return out


def run(data, setting: dict, seed: int, arm: dict, epochs: int, wd=5e-4, lr=0.1, bs=128) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte), classes = data
    torch.manual_seed(seed)
    model = Net(setting["shape"], classes, setting["k"])
    wc = arm.get("wc")
    if wc is not None:
        adapt.attach(model, "compander", targets=r"features\.(0|4)|head", **wc)
        for n, p in model.named_parameters():  # biases and BN train too (the paper trains from scratch)
            if not n.endswith("base_layer.weight"):
                p.requires_grad_(True)
        opt = torch.optim.SGD(param_groups(model, wd), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps_per_epoch = (len(ytr) + bs - 1) // bs
    miles = [int(f * epochs) * steps_per_epoch for f in (0.3, 0.6, 0.8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, miles, gamma=0.2)
    g = torch.Generator().manual_seed(seed)
    best, best_state, max_first = -1.0, None, 0.0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for s in range(0, len(perm), bs):
            i = perm[s:s + bs]
            loss = F.cross_entropy(model(shift(xtr[i], setting["shape"], setting["shift"], g)), ytr[i])
            if wc is not None:
                loss = loss + decay_penalty(model, wd)  # decay on w = Psi(v) for fixed a, b (Sec. III-A2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        max_first = max(max_first, float(weights(model)[0].abs().max()))  # Fig. 3: the first conv over training
        va = accuracy(model, xva, yva)
        if va > best:
            best = va
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    ws = weights(model)
    allw = torch.cat(ws)
    res = dict(val=best, test=accuracy(model, xte, yte), max_first_during=max_first,
               near0_first=float((ws[0].abs() < 0.01).float().mean()),
               near0_all=float((allw.abs() < 0.01).float().mean()),
               max_first=float(ws[0].abs().max()), max_all=float(allw.abs().max()))
    if wc is not None and wc.get("learn_hparams"):
        res["ab"] = [[round(m.adapter.a.item(), 3), round(m.adapter.b.item(), 3)]
                     for m in model.modules() if isinstance(m, adapt.AdapterLayer)]
        adapt.fold(model)  # Sec. III-A4: Psi(v) copied into the plain network, same predictions
        assert abs(accuracy(model, xte, yte) - res["test"]) < 1e-9
    return res


def ms(xs, scale=100.0, nd=2) -> str:
    m = f"{scale * statistics.mean(xs):.{nd}f}"
    return f"{m} ± {scale * statistics.stdev(xs):.{nd}f}" if len(xs) > 1 else m


def tables(out: dict) -> str:
    """The markdown tables of RESULTS.md from the JSON this script writes."""
    lines = []
    for name, d in out.items():
        rows = d["rows"]
        base = rows[next(iter(rows))]
        lines += [f"**{name}** ({d['epochs']} epochs, grid pick a={d['picked'][0]}, b={d['picked'][1]}; "
                  f"{d['seconds'] / 60:.0f} min wall):", "",
                  "| arm | test acc % (mean ± std) | Δ vs baseline, paired (pts) | seeds better/worse/equal "
                  "| abs(w) < 0.01, first conv % | abs(w) < 0.01, all % | max abs(w), first conv (end / during) "
                  "| max abs(w), all |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, r in rows.items():
            diff = [x["test"] - y["test"] for x, y in zip(r, base)]
            wins = f"{sum(t > 0 for t in diff)}/{sum(t < 0 for t in diff)}/{sum(t == 0 for t in diff)}"
            first = arm == next(iter(rows))
            lines.append(f"| {arm} | {ms([x['test'] for x in r])} | {'—' if first else ms(diff)} | "
                         f"{'—' if first else wins} | {ms([x['near0_first'] for x in r], nd=1)} | "
                         f"{ms([x['near0_all'] for x in r], nd=1)} | "
                         f"{statistics.mean(x['max_first'] for x in r):.3f} / "
                         f"{statistics.mean(x['max_first_during'] for x in r):.3f} | "
                         f"{statistics.mean(x['max_all'] for x in r):.3f} |")
        learned = [x["ab"] for arm, r in rows.items() for x in r if "ab" in x]
        if learned:
            per_layer = list(zip(*learned))
            lines.append("")
            lines.append("Learned (a, b) per layer at the best checkpoint, mean over seeds (conv1, conv2, head): "
                         + ", ".join(f"({statistics.mean(p[0] for p in L):.2f}, {statistics.mean(p[1] for p in L):.2f})"
                                     for L in per_layer))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="default: 40 (digits), 30 (MNIST-1D)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-frac", type=float, default=1.0, help="keep this fraction of the training split")
    ap.add_argument("--json", default="/tmp/fidelity_compander.json")
    ap.add_argument("--tables", nargs="+", help="only print the markdown tables of these JSON files")
    args = ap.parse_args()
    if args.tables:
        print(tables({k: v for f in args.tables for k, v in json.loads(Path(f).read_text()).items()}))
        return
    torch.set_num_threads(args.threads)
    out = {}
    for name in args.datasets:
        data, setting = load(name, args.train_frac), SETTINGS[name]
        epochs = args.epochs or setting["epochs"]
        t0 = time.time()
        grid = {ab: run(data, setting, GRID_SEED, {"wc": dict(a=ab[0], b=ab[1])}, epochs)["val"] for ab in GRID}
        a, b = max(GRID, key=lambda ab: (grid[ab], -abs(ab[0] - 0.7) - abs(ab[1] - 0.7)))
        print(f"[{name}] grid (val acc, seed {GRID_SEED}): " + ", ".join(f"{k}: {v:.3f}" for k, v in grid.items())
              + f" -> a={a}, b={b}  ({time.time() - t0:.0f}s)", flush=True)
        arms = {"baseline (wd+BN+dropout+aug)": {}, f"+ WC fixed a={a}, b={b} (grid)": {"wc": dict(a=a, b=b)},
                "+ WC fixed a=b=0.7 (default)": {"wc": {}},
                "+ WC learned per layer (init 0.5, 1.0)": {"wc": dict(learn_hparams=True)}}
        rows = {}
        for arm_name, arm in arms.items():
            rows[arm_name] = [run(data, setting, s, arm, epochs) for s in range(1, args.seeds + 1)]
            r = rows[arm_name]
            print(f"[{name}] {arm_name}: test {ms([x['test'] for x in r])}  near0(first conv) "
                  f"{ms([x['near0_first'] for x in r])}%  "
                  f"max|w| first conv {statistics.mean(x['max_first'] for x in r):.3f} "
                  f"(max during training {statistics.mean(x['max_first_during'] for x in r):.3f})  "
                  f"near0(all) {ms([x['near0_all'] for x in r])}%  ({time.time() - t0:.0f}s)", flush=True)
        key = name if args.train_frac == 1 else f"{name}, {args.train_frac:g} of the training split"
        out[key] = dict(grid={f"{k[0]},{k[1]}": v for k, v in grid.items()}, picked=[a, b], rows=rows,
                        epochs=epochs, seconds=time.time() - t0)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    print(tables(out))


if __name__ == "__main__":
    main()
