"""Orthogonal adaptation vs plain LoRA: interference when two independently trained concept adapters are summed.

Base: the zoo digits MLP (64-64-64-10) trained on classes 0-4 only. Concept A: an adapter on every
linear layer fine-tuned on classes 5-7; concept B: on classes 8-9 (each sees only its own data and
never the other adapter). Each concept's held-out loss (cross-entropy on its classes' test
samples) is measured with its adapter alone and after summing both adapters into the base
(W0 + dW_A + dW_B), for LoRA and orthogonal adaptation at the same rank, over seeds.

Run: .venv/bin/python benchmarks/orthogonal_interference.py [--seeds 3] [--steps 300]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, md_table, write_section  # noqa: E402

from weightlab import adapt, zoo  # noqa: E402
from weightlab.zoo.classifiers import build_model, train_classifier  # noqa: E402

CONCEPTS = {"A": (5, 6, 7), "B": (8, 9)}
TARGETS = r"body\.[0-9]+"


def subset(x, y, classes):
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def train_concept(base, method, cid, seed, x, y, r, steps, lr):
    m = copy.deepcopy(base)
    kw = dict(concept=cid, seed=1234) if method == "orthogonal" else dict(seed=seed * 10 + cid)
    adapt.attach(m, method, targets=TARGETS, r=r, alpha=r, **kw)
    opt = torch.optim.Adam(adapt.trainable_parameters(m), lr=lr)
    g = torch.Generator().manual_seed(seed * 10 + cid)
    m.train()
    for _ in range(steps):
        i = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[i]), y[i]).backward()
        opt.step()
    return m.eval()


def loss(model, x, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def summed(base, models):
    out = copy.deepcopy(base)
    with torch.no_grad():
        for n, mod in out.named_modules():
            if isinstance(mod, nn.Linear) and n.startswith("body."):
                mod.weight += sum(adapt.adapter_layers(m)[n].merged_weight() - mod.weight for m in models)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = zoo.digits()
    base = train_classifier(build_model("mlp", ds, 0), ds, epochs=20, lr=3e-3, class_subset=(0, 1, 2, 3, 4))
    data = {c: (subset(ds.x_train, ds.y_train, cl), subset(ds.x_test, ds.y_test, cl)) for c, cl in CONCEPTS.items()}
    res: dict = {}
    t0 = time.perf_counter()
    for method in ("lora", "orthogonal"):
        for seed in range(a.seeds):
            ms = {c: train_concept(base, method, k, seed, *data[c][0], a.rank, a.steps, a.lr)
                  for k, c in enumerate(CONCEPTS)}
            merged = summed(base, list(ms.values()))
            for c in CONCEPTS:
                xt, yt = data[c][1]
                res.setdefault((method, c), []).append((loss(base, xt, yt), loss(ms[c], xt, yt), loss(merged, xt, yt)))
            res.setdefault((method, "trainable"), adapt.count_trainable(ms["A"]))
    secs = time.perf_counter() - t0
    rows = []
    for method in ("lora", "orthogonal"):
        for c in CONCEPTS:
            v = res[(method, c)]
            base_l, alone, merged = (statistics.mean(t[i] for t in v) for i in range(3))
            inc = [t[2] - t[1] for t in v]
            rows.append([method, f"{c} {CONCEPTS[c]}", res[(method, "trainable")], f"{base_l:.3f}", f"{alone:.3f}",
                         f"{merged:.3f}", f"{statistics.mean(inc):+.3f} (max {max(inc):+.3f})"])
    body = (f"{machine_line()}; torch {torch.__version__}, 1 thread; {a.seeds} seeds, {a.steps} Adam steps "
            f"(lr {a.lr}, batch 64), rank {a.rank}, alpha = r, adapters on all three linears; {secs:.0f} s.\n\n"
            "Base: zoo digits MLP trained on classes 0-4. Each concept adapter is trained alone on its classes; "
            "'merged' sums both adapters into the base. Loss = cross-entropy on the concept's test samples "
            "(mean over seeds); interference = merged - alone.\n\n"
            + md_table(["method", "concept (classes)", "trainable", "base loss", "alone", "merged",
                        "interference"], rows)
            + "\n\nOrthogonal adaptation trains only the output factor (r*out per layer, about half of LoRA's "
              "r*(in+out) here). Its guarantee is exact only for inputs inside a concept's subspace (the tests "
              "check that); real inputs of one concept also have components in the other's subspace, so "
              "the reduction in interference measured here is what the disjoint input factors buy in practice.\n")
    print(body)
    if not a.no_write:
        write_section("Orthogonal adaptation: interference of summed concept adapters", body)


if __name__ == "__main__":
    main()
