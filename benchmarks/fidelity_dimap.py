"""Fidelity: does DIMAP beat magnitude pruning at equal parameter reduction on a hierarchical ViT?

    nice .venv/bin/python benchmarks/fidelity_dimap.py --out /tmp/dimap_section.md       # 3 seeds in one process
    nice .venv/bin/python benchmarks/fidelity_dimap.py --seeds 0 --epochs 5 --out /tmp/x.md   # smoke run
    # seeds in parallel processes, then one aggregation:
    nice .venv/bin/python benchmarks/fidelity_dimap.py --seeds 1 --save /tmp/dimap1.json      # x each seed
    .venv/bin/python benchmarks/fidelity_dimap.py --load /tmp/dimap0.json /tmp/dimap1.json /tmp/dimap2.json --out ...
    flock /tmp/wl-shared.lock python3 /tmp/h/put_section.py benchmarks/RESULTS.md "## Fidelity: DIMAP" \
        /tmp/dimap_section.md "benchmarks: DIMAP fidelity"

Claim (He & Zhou, ICLR 2024, Tables 1 and 3): DIMAP's module-aware, data-free score prunes Swin far better
than magnitude pruning at the same share of removed parameters (Swin-B -52.7% parameters for -0.07% top-5
after fine-tuning; at 50% removed, uniform magnitude pruning keeps 6-15% top-1 where DIMAP keeps 71-78%).

No Swin weights are offline, so a small hierarchical ViT is trained here on scikit-learn's digits (8x8
upsampled to 16x16): 2x2 patch embedding to 8x8 tokens of width 32, stage 1 with two blocks of 4x4 window
attention (the second shifted by 2, cyclically, without Swin's mask), patch merging (2x2 concat, LayerNorm,
Linear 128->64), stage 2 with two blocks of global attention at 4x4 tokens, width 64, mean pool, head.
Every arm prunes the same layers (the stage ModuleList: attention, MLP and patch merging; patch embedding and
head stay dense, as weightlab's `prune` finds them) one-shot with `prune(model, "magnitude", s, allocation=...)`
and is evaluated as is and after a short masked fine-tune.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ALLOCATIONS = ("dimap", "global", "uniform", "lamp", "dimap-model")
LABEL = {"dimap": "DIMAP", "global": "global magnitude", "uniform": "uniform magnitude", "lamp": "LAMP (global)",
         "dimap-model": "DIMAP, model as module (Table 4)"}


class Attention(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, H, W, C); attention inside non-overlapping window x window tiles
        B, H, W, C = x.shape
        w, h = self.window, self.heads
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        t = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        q, k, v = self.qkv(t).view(t.shape[0], w * w, 3, h, C // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(t.shape[0], w * w, C)
        o = self.proj(o).view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return torch.roll(o, (self.shift, self.shift), (1, 2)) if self.shift else o


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, window, shift), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, dim, heads, window, depth, merge):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, window, (window // 2) * (i % 2) if window < 8 else 0)
                                     for i in range(depth)])
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.downsample(x) if self.downsample is not None else x


class HierViT(nn.Module):
    """Swin-like names (stages.{s}.blocks.{i}.attn.qkv, ..., stages.0.downsample.reduction)."""

    def __init__(self, dim=32, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 2, 2)
        self.pos = nn.Parameter(torch.zeros(1, 8, 8, dim))
        self.stages = nn.ModuleList([Stage(dim, 2, 4, 2, True), Stage(2 * dim, 4, 4, 2, False)])
        self.norm, self.head = nn.LayerNorm(2 * dim), nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1) + self.pos
        for s in self.stages:
            x = s(x)
        return self.head(self.norm(x).mean((1, 2)))


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return (x[tr], y[tr]), (x[te], y[te])


def train(model, data, epochs, lr, seed, wd=0.05, keeper_names=None):
    """AdamW with linear warm-up (1 epoch) and cosine decay; pruned weights held at zero if names are given."""
    from weightlab.compress import MaskKeeper, masks_from_zeros

    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    keeper = None
    if keeper_names is not None:
        keeper = MaskKeeper(model, masks_from_zeros(model, keeper_names)).attach(opt)
    steps_per, bs = math.ceil(len(y) / 64), 64
    total = epochs * steps_per
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / steps_per) * 0.5 * (1 + math.cos(math.pi * t / total)))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if keeper is not None:
        keeper.release()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def stage_keep(model):
    """Kept share of each stage's attention/MLP weights (DIMAP's Fig. 5 view)."""
    from weightlab.compress.dimap import module_of, stage_of

    kept, total = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith("stages.") and module_of(n) != "aux":
            s = stage_of(n)
            kept[s] = kept.get(s, 0) + int((m.weight != 0).sum())
            total[s] = total.get(s, 0) + m.weight.numel()
    return {s: kept[s] / total[s] for s in sorted(total)}


@torch.no_grad()
def prune_model_as_module(model, sparsity):
    """The paper's Table 4 ablation: one Eq. 10 threshold over all attention/MLP layers, AUX-M dense."""
    from weightlab.compress import target_layers
    from weightlab.compress.dimap import dimap_counts

    layers = target_layers(model)
    counts = dimap_counts({n: m.weight for n, m in layers.items()}, sparsity, model_as_module=True)
    for n, c in counts.items():
        w = layers[n].weight
        w.view(-1)[torch.sort(w.abs().reshape(-1), stable=True).indices[:c]] = 0
    return list(layers), sum(counts.values()) / sum(m.weight.numel() for m in layers.values())


def run_seed(seed, args, train_data, test_data):
    from weightlab.compress import prune

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    dense = train(HierViT(), train_data, args.epochs, 2e-3, seed)
    out = {"dense": accuracy(dense, test_data), "train_s": time.perf_counter() - t0, "arms": {}, "stages": {}}
    C.log(f"seed {seed}: dense acc {out['dense']:.3f} ({out['train_s']:.0f} s)")
    for s in args.sparsities:
        for alloc in ALLOCATIONS:
            m = copy.deepcopy(dense)
            if alloc == "dimap-model":
                names, achieved = prune_model_as_module(m, s)
            else:
                rep = prune(m, "magnitude", s, allocation=alloc, show_progress=False)
                names, achieved = [r["name"] for r in rep.layers], rep.sparsity
            one = accuracy(m, test_data)
            if alloc == "dimap":
                out["stages"][s] = stage_keep(m)
            ft = accuracy(train(m, train_data, args.ft_epochs, 5e-4, seed + 100, wd=0.0, keeper_names=names),
                          test_data)
            out["arms"][(alloc, s)] = {"one": one, "ft": ft, "achieved": achieved}
            C.log(f"seed {seed} {alloc:8s} {s:.0%}: one-shot {one:.3f}  fine-tuned {ft:.3f}  "
                  f"(sparsity {achieved:.3f})")
    return out


def fmt(vals):
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"


def section(runs, args, loads, cpu_s, wall_s, n_params, n_target, n_aux):
    lines = ["## Fidelity: DIMAP", ""]
    lines += ["Paper: He & Zhou, \"Data-independent Module-aware Pruning for Hierarchical Vision Transformers\" "
              "(ICLR 2024, arXiv 2404.13648). **Claim**: ranking weights by the data-free score of Eq. 10 "
              "within QKV/PRJ/MLP modules that span all stages (AUX layers kept dense) beats magnitude pruning "
              "at equal parameter reduction on hierarchical ViTs: Swin-B -52.7% parameters with a 0.07% top-5 "
              "drop after a 30-epoch fine-tune (Table 1); at 50% of parameters removed, uniform magnitude keeps "
              "6-15% top-1 and DIMAP 71-78% (Table 3).", ""]
    lines += [f"**Setting** (`benchmarks/fidelity_dimap.py`, `weightlab.compress.dimap`, {C.today()}): a "
              f"Swin-like hierarchical ViT ({n_params / 1e3:.0f}k parameters; patch embedding 2x2 -> 8x8 tokens "
              "of width 32; stage 1: 2 blocks of 4x4 window attention, the second cyclically shifted; patch "
              "merging 128->64; stage 2: 2 blocks of global attention on 4x4 tokens, width 64; mean pool, head) "
              "trained from scratch on scikit-learn digits (8x8 upsampled to 16x16; 1437 train / 360 test, "
              f"stratified split), AdamW lr 2e-3, wd 0.05, batch 64, {args.epochs} epochs, cosine with 1 warm-up "
              f"epoch. Pruned layers: the {n_target / 1e3:.1f}k weights of the stages (attention, MLP and patch "
              f"merging; {n_aux / n_target:.1%} of them are patch merging = DIMAP's AUX-M, which DIMAP keeps "
              "dense and the others prune); one-shot `prune(model, \"magnitude\", s, allocation=...)` with "
              "allocation dimap (the paper's rule, see docs/design.md), global (one |W| threshold), uniform "
              "(every layer at s, the paper's Table 3 baseline) and lamp (the same score as DIMAP with one "
              "threshold over all layers, AUX included), plus the paper's Table 4 ablation 'model as module' "
              "(DIMAP's score and AUX rule, one threshold over all attention/MLP layers). Fine-tune: "
              f"{args.ft_epochs} epochs, AdamW lr 5e-4, "
              "wd 0, cosine, pruned weights held at zero (MaskKeeper). Accuracy is top-1 on the 360 test "
              f"images. Seeds {', '.join(map(str, args.seeds))} (init, batch order). torch threads "
              f"{torch.get_num_threads()}, run under `nice`. {C.machine_line()}. {C.load_sentence(loads)} "
              f"{cpu_s:.0f} CPU s in all, {wall_s:.0f} s wall (the longest process).", ""]
    dense = [r["dense"] for r in runs]
    rows = [["dense", "0%", fmt(dense), fmt(dense), " ".join(f"{v:.3f}" for v in dense)]]
    for s in args.sparsities:
        for a in ALLOCATIONS:
            one = [r["arms"][(a, s)]["one"] for r in runs]
            ft = [r["arms"][(a, s)]["ft"] for r in runs]
            per_seed = " ".join(f"{o:.3f}/{f:.3f}" for o, f in zip(one, ft))
            rows.append([LABEL[a], f"{s:.0%}", fmt(one), fmt(ft), per_seed])
    lines += [C.md_table(["allocation", "removed (of the stage weights)", "one-shot acc (mean ± sd)",
                          f"after {args.ft_epochs}-epoch fine-tune", "per seed (one-shot/fine-tuned)"], rows), ""]
    st = {s: [statistics.mean(r["stages"][s][k] for r in runs) for k in sorted(runs[0]["stages"][s])]
          for s in args.sparsities}
    lines += ["DIMAP's kept share of attention+MLP weights per stage (mean over seeds): "
              + "; ".join(f"{s:.0%} removed: " + ", ".join(f"stage {i} {v:.2f}" for i, v in enumerate(vals))
                          for s, vals in st.items()) + ".", ""]
    # verdict: DIMAP against both magnitude baselines at every sparsity, one-shot and fine-tuned
    diffs, wins, cells = [], 0, 0
    for s in args.sparsities:
        for phase in ("one", "ft"):
            d = statistics.mean(r["arms"][("dimap", s)][phase] for r in runs)
            for base in ("global", "uniform"):
                b = statistics.mean(r["arms"][(base, s)][phase] for r in runs)
                cells += 1
                wins += d >= b
                diffs.append(f"{s:.0%} {'one-shot' if phase == 'one' else 'fine-tuned'} vs {base}: {d - b:+.3f}")
    top = max(args.sparsities)
    gap = min(statistics.mean(r["arms"][("dimap", top)]["one"] for r in runs)
              - statistics.mean(r["arms"][(b, top)]["one"] for r in runs) for b in ("global", "uniform"))
    if wins == cells and gap > 0.01:
        verdict = "reproduced"
    elif wins >= cells / 2:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    lam = [statistics.mean(r["arms"][("dimap", s)][p] for r in runs)
           - statistics.mean(r["arms"][("lamp", s)][p] for r in runs) for s in args.sparsities for p in ("one", "ft")]
    mam = [statistics.mean(r["arms"][("dimap", s)][p] for r in runs)
           - statistics.mean(r["arms"][("dimap-model", s)][p] for r in runs)
           for s in args.sparsities for p in ("one", "ft")]
    lines += [f"Verdict (reproduced = DIMAP's mean at least that of global and of uniform magnitude in every "
              f"cell and more than 1 point ahead of both one-shot at {top:.0%}): **{verdict}** ({wins} of "
              f"{cells} cells).", "- DIMAP minus magnitude (mean accuracy): " + "; ".join(diffs),
              "- DIMAP minus LAMP (global), same cells: " + ", ".join(f"{v:+.3f}" for v in lam),
              "- DIMAP minus DIMAP with the model as one module (the paper's Table 4 ablation), same cells: "
              + ", ".join(f"{v:+.3f}" for v in mam), ""]
    return "\n".join(lines)


def _to_json(run):
    return dict(run, arms={f"{a}@{s}": v for (a, s), v in run["arms"].items()},
                stages={str(s): {str(k): v for k, v in st.items()} for s, st in run["stages"].items()})


def _from_json(run):
    return dict(run, arms={(k.split("@")[0], float(k.split("@")[1])): v for k, v in run["arms"].items()},
                stages={float(s): {int(k): v for k, v in st.items()} for s, st in run["stages"].items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", type=Path, help="write this process's runs (JSON) instead of a section")
    ap.add_argument("--load", type=Path, nargs="+", help="aggregate runs saved by --save")
    ap.add_argument("--out", type=Path, help="write the RESULTS.md section here (commit it with put_section.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.load:
        saved = [json.loads(p.read_text()) for p in args.load]
        runs = [_from_json(r) for d in saved for r in d["runs"]]
        loads = [x for d in saved for x in d["loads"]]
        cpu_s, wall_s = sum(d["cpu_s"] for d in saved), max(d["wall_s"] for d in saved)
        args.seeds = [r["seed"] for r in runs]
        for k in ("epochs", "ft_epochs", "sparsities", "threads"):
            setattr(args, k, saved[0][k])
        torch.set_num_threads(args.threads)
    else:
        train_data, test_data = digits()
        loads, t0, c0 = [os.getloadavg()[0]], time.perf_counter(), time.process_time()
        runs = [dict(run_seed(s, args, train_data, test_data), seed=s) for s in args.seeds]
        loads.append(os.getloadavg()[0])
        cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
        if args.save:
            args.save.write_text(json.dumps({"runs": [_to_json(r) for r in runs], "loads": loads, "cpu_s": cpu_s,
                                             "wall_s": wall_s, "epochs": args.epochs, "ft_epochs": args.ft_epochs,
                                             "sparsities": args.sparsities, "threads": args.threads}))
            return
    m = HierViT()
    from weightlab.compress import target_layers
    from weightlab.compress.dimap import module_of

    layers = target_layers(m)
    n_target = sum(x.weight.numel() for x in layers.values())
    n_aux = sum(x.weight.numel() for n, x in layers.items() if module_of(n) == "aux")
    text = section(runs, args, loads, cpu_s, wall_s, sum(p.numel() for p in m.parameters()), n_target, n_aux)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
