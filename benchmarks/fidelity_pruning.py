"""Fidelity: do SPDF and "Rethinking the value of network pruning" reproduce on zoo-sized models?

    .venv/bin/python benchmarks/fidelity_pruning.py                       # both, 3 seeds, writes RESULTS.md
    .venv/bin/python benchmarks/fidelity_pruning.py --only spdf --seeds 0 --no-write
    # seeds in parallel processes, then one aggregation that writes the section:
    .venv/bin/python benchmarks/fidelity_pruning.py --only rethinking --worker --seeds 0 --runs /tmp/runs  # x seeds
    .venv/bin/python benchmarks/fidelity_pruning.py --only rethinking --runs /tmp/runs

SPDF (claim: 75% sparse pre-training + dense fine-tuning loses no significant downstream accuracy against
dense pre-training, for a fraction of the pre-training FLOPs). MLP 40-256-256-10, AdamW pre-training with a
static random mask (head dense), then the mask released and every arm fine-tuned the same way on
--ft-per-class labeled rows per class. Two settings: in-domain (pre-training on 15000 regenerated MNIST-1D
rows, fine-tuning on the benchmark split) and new classes (pre-training on classes 0-4, fine-tuning and
testing on 5-9). Arms: dense pre-training; SPDF 50% and 75%; dense pre-training cut to the FLOPs of SPDF 75%
(equal FLOPs); no pre-training (what pre-training is worth in the setting).

Rethinking (claim: for structured pruning, training the pruned architecture from scratch matches or beats
fine-tuning the pruned model; unstructured pruning at high sparsity is where scratch can fall short).
Settings: MLP 40-256-256-10 on MNIST-1D, SmallCNN (16, 32) on digits; the anchor's CIFAR recipe shape
(SGD 0.1, momentum 0.9, wd 1e-4, lr x0.1 at 50%/75%; E epochs), L1-norm channel pruning and global
magnitude masks; arms: fine-tune E/4 epochs at lr 1e-3 (the anchor's 40 of 160), fine-tune E epochs
(equal epochs), Scratch-E, Scratch-B (equal FLOPs, uncapped as in the anchor's CIFAR code).
Runs in one process: there is no anchor library to time against, only the papers' claims.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SPDF_TITLE = "Fidelity: SPDF"
RETHINK_TITLE = "Fidelity: Rethinking the value of network pruning"


def _subset(x, y, classes, per_class=None, seed=0):
    import torch

    keep = torch.isin(y, torch.tensor(classes))
    idx = keep.nonzero().squeeze(1)
    if per_class is not None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([c[torch.randperm(len(c), generator=g)[:per_class]]
                         for c in (idx[y[idx] == k] for k in classes)])
    return x[idx], y[idx]


def spdf_settings(seed: int, args) -> dict:
    """setting -> (pretrain (x, y), fine-tune (x, y), test (x, y), pretrain epochs, fine-tune lr)."""
    import torch

    from weightlab.zoo import load_dataset
    from weightlab.zoo.tabular import mnist1d

    data = load_dataset("mnist1d")
    # in-domain: abundant pre-training data (MNIST-1D regenerated with seeds 1-3: 15000 rows, all classes, as an
    # LM corpus covers its downstream tasks), a small labeled downstream set from the benchmark split
    gen = [mnist1d(s) for s in (1, 2, 3)]
    big = (torch.cat([t for d in gen for t in (d.x_train, d.x_test)]),
           torch.cat([t for d in gen for t in (d.y_train, d.y_test)]))
    ten = list(range(10))
    return {"in-domain": (big, _subset(data.x_train, data.y_train, ten, args.ft_per_class, seed),
                          (data.x_test, data.y_test), args.spdf_epochs, 1e-4),
            "new classes": (_subset(data.x_train, data.y_train, [0, 1, 2, 3, 4]),
                            _subset(data.x_train, data.y_train, [5, 6, 7, 8, 9], args.ft_per_class, seed),
                            _subset(data.x_test, data.y_test, [5, 6, 7, 8, 9]), 4 * args.spdf_epochs, 1e-3)}


def spdf_seed(seed: int, args) -> dict:
    import torch

    from weightlab.compress.sparse_train import Recipe, train, training_flops
    from weightlab.compress.spdf import SPDFConfig, equal_flops_epochs, random_masks, sparsified_layers, spdf
    from weightlab.zoo import MLP, accuracy

    def fresh():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MLP(40, (256, 256), 10)

    out = {}
    for setting, (pre, ft, test, epochs, ft_lr) in spdf_settings(seed, args).items():
        base = SPDFConfig(pretrain_epochs=epochs, finetune_epochs=args.ft_epochs, finetune_lr=ft_lr, seed=seed)
        ex = pre[0][:1]
        for s in (0.5, 0.75):
            m = fresh()
            res = spdf(m, pre, ft, base.model_copy(update={"sparsity": s}))
            out[f"{setting}: SPDF {int(s * 100)}%"] = {"acc": accuracy(m, *test), "epochs": epochs,
                                                        "pretrain_flops": res.pretrain_flops}
        m0 = fresh()
        masks75 = random_masks(m0, 0.75, sparsified_layers(m0), seed)
        eq_epochs = max(1, round(equal_flops_epochs(m0, masks75, ex, epochs)))
        for name, ep in (("dense", epochs), ("dense, FLOPs of SPDF 75%", eq_epochs), ("no pre-training", 0)):
            m = fresh()
            if ep:
                train(m, *pre, Recipe(ep, base.lr, "adamw", weight_decay=base.weight_decay), seed=seed)
            train(m, *ft, base.finetune_recipe(), seed=seed + 1)
            out[f"{setting}: {name}"] = {"acc": accuracy(m, *test), "epochs": ep,
                                          "pretrain_flops": training_flops(m, ex, ep * len(pre[1]))}
    C.log(f"spdf seed {seed}: " + ", ".join(f"{k} {v['acc']:.3f}" for k, v in out.items()))
    return out


def rethink_seed(seed: int, args) -> dict:
    import torch

    from weightlab.compress.rethinking import RethinkingConfig, finetune, prune_for, train_from_scratch
    from weightlab.compress.sparse_train import train
    from weightlab.zoo import MLP, SmallCNN, accuracy, load_dataset

    out = {}
    for setting, dataset, epochs in (("MLP 256-256, MNIST-1D", "mnist1d", args.mlp_epochs),
                                     ("SmallCNN 16-32, digits", "digits", args.cnn_epochs)):
        data = load_dataset(dataset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            large = MLP(40, (256, 256), 10) if dataset == "mnist1d" else SmallCNN(10, (16, 32))
        cfg0 = RethinkingConfig(epochs=epochs, seed=seed)
        train(large, data.x_train, data.y_train, cfg0.recipe(epochs), seed=seed)
        large_acc = accuracy(large, data.x_test, data.y_test)
        for structure, ratio in (("channels", 0.5), ("channels", 0.75), ("weights", 0.5), ("weights", 0.9)):
            cfg = cfg0.model_copy(update={"structure": structure, "ratio": ratio, "seed": seed + 100})
            pruned, masks = prune_for(large, cfg)
            row = {"large": large_acc, "pruned, no training": accuracy(pruned, data.x_test, data.y_test),
                   "params": sum(p.numel() for p in pruned.parameters()) if masks is None else
                   sum(int(m.sum()) for m in masks.values())}
            for name, res in (("fine-tune E/4", finetune(pruned, data, cfg, masks=masks)),
                              ("fine-tune E", finetune(pruned, data, cfg, epochs=epochs, masks=masks)),
                              ("Scratch-E", train_from_scratch(pruned, data, cfg, masks=masks)),
                              ("Scratch-B", train_from_scratch(pruned, data, cfg.model_copy(update={"budget": "B"}),
                                                               large=large, masks=masks))):
                row[name] = accuracy(res.model, data.x_test, data.y_test)
                row[name + " epochs"] = res.epochs
            out[f"{setting}: {structure} {int(ratio * 100)}%"] = row
            C.log(f"rethinking seed {seed} {setting} {structure} {ratio}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    return out


def _ms(vals) -> str:
    vals = list(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def spdf_section(runs: list[dict], args, load: str, cpu: float) -> str:
    arms = list(runs[0])
    rows = [[a, runs[0][a]["epochs"], f"{runs[0][a]['pretrain_flops'] / 1e9:.2f}",
             _ms(r[a]["acc"] for r in runs), " ".join(f"{r[a]['acc']:.3f}" for r in runs)] for a in arms]
    lines, ok = [], {}
    for setting in ("in-domain", "new classes"):
        def acc(r, arm):
            return r[f"{setting}: {arm}"]["acc"]
        for sp in ("75%", "50%"):
            d = [acc(r, f"SPDF {sp}") - acc(r, "dense") for r in runs]
            ok[(setting, sp)] = statistics.mean(d) >= -0.01
            lines.append(f"- {setting}, SPDF {sp} minus dense pre-training: {', '.join(f'{x:+.3f}' for x in d)} "
                         f"(mean {statistics.mean(d):+.3f})")
        deq = [acc(r, "SPDF 75%") - acc(r, "dense, FLOPs of SPDF 75%") for r in runs]
        gain = [acc(r, "dense") - acc(r, "no pre-training") for r in runs]
        lines.append(f"- {setting}, SPDF 75% minus dense pre-training at equal FLOPs: "
                     f"{', '.join(f'{x:+.3f}' for x in deq)}; dense pre-training minus none: "
                     f"{', '.join(f'{x:+.3f}' for x in gain)}")
    f = runs[0]
    red = f["in-domain: dense"]["pretrain_flops"] / f["in-domain: SPDF 75%"]["pretrain_flops"]
    head = ("**reproduced**" if all(ok.values()) else "**not reproduced**" if not any(ok.values()) else
            "**partly reproduced** (" + ", ".join(f"{s} {p}" for (s, p), v in ok.items() if v) + " within 1 point)")
    return f"""Paper: Thangarasa et al., "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models"
(UAI 2023). **Claim**: up to 75% unstructured weight sparsity during pre-training (static random mask), then
dense fine-tuning, gives about 2.5x fewer pre-training FLOPs on GPT-3 XL without a significant loss in
downstream accuracy against the dense baseline.

**Setting** (`benchmarks/fidelity_pruning.py`, `weightlab.compress.spdf`, {C.today()}): MLP 40-256-256-10,
pre-training with AdamW lr 3e-3, wd 0.1, batch 64; the mask covers both hidden weight matrices (head dense, like
the paper's dense embeddings) at exact per-layer sparsity, held by MaskKeeper; then it is released and every arm
is fine-tuned the same way: dense, AdamW (fresh state), {args.ft_epochs} epochs on {args.ft_per_class} labeled
rows per class. *in-domain*: pre-training on 15000 MNIST-1D rows regenerated with seeds 1-3 (all classes, like an
LM corpus that covers its downstream tasks), fine-tuning lr 1e-4 on the benchmark split's rows, test on its 1000
test rows. *new classes*: pre-training on the benchmark split's classes 0-4, fine-tuning lr 1e-3 on classes 5-9,
test on the 5-9 test rows (argmax over all 10 logits). Pre-training FLOPs: 3 x 2 x kept weights x rows seen
(75% sparsity: {red:.2f}x fewer here, the head being dense; the paper's 2.5x includes dense attention).
Seeds {', '.join(map(str, args.seeds))} (init, mask, batch order, downstream sample). {load} {cpu:.0f} CPU s in all.

{C.md_table(["setting, arm", "pre-training epochs", "pre-training GFLOPs", "downstream acc (mean ± sd)",
             "per seed"], rows)}

Verdict (claim met when the mean loss against dense pre-training is at most 1 point): {head}.
{chr(10).join(lines)}
Caveat: a 0.08M-parameter MLP and a toy data set, not a 1.3B LM. The paper relates the loss to sparsity, task
complexity and dataset size; here it grows with sparsity and is large when the downstream task (new classes)
needs features the sparse pre-training did not build.
"""


def rethink_section(runs: list[dict], args, load: str, cpu: float) -> str:
    arms = ["fine-tune E/4", "fine-tune E", "Scratch-E", "Scratch-B"]
    rows, verdicts = [], []
    for key in runs[0]:
        r0 = runs[0][key]
        rows.append([key, r0["params"], _ms(r[key]["large"] for r in runs),
                     _ms(r[key]["pruned, no training"] for r in runs)]
                    + [f"{_ms(r[key][a] for r in runs)} ({r0[a + ' epochs']} ep)" for a in arms])
        d = [r[key]["Scratch-E"] - r[key]["fine-tune E"] for r in runs]
        db = [r[key]["Scratch-B"] - max(r[key]["fine-tune E"], r[key]["fine-tune E/4"]) for r in runs]
        verdicts.append((key, d, db))
    struct = [v for v in verdicts if "channels" in v[0]]
    won = sum(statistics.mean(db) >= -0.005 for _, _, db in struct)
    lines = "\n".join(f"- {k}: Scratch-E minus fine-tune-E per seed {', '.join(f'{x:+.3f}' for x in d)}; "
                      f"Scratch-B minus the better fine-tune {', '.join(f'{x:+.3f}' for x in db)}"
                      for k, d, db in verdicts)
    head = ("**reproduced**" if won == len(struct) else "**partly reproduced**" if won else "**not reproduced**")
    unstr = [(k, statistics.mean(db)) for k, _, db in verdicts if "weights" in k]
    unstr_line = ("Unstructured masks (the paper: scratch matches on CIFAR-size data, falls short at high sparsity on "
                  "ImageNet, which is not exercised here): Scratch-B minus the better fine-tune, mean "
                  + ", ".join(f"{k.split(': ')[-1]} ({k.split(',')[0]}) {m:+.3f}" for k, m in unstr) + ".")
    return f"""Paper: Liu et al., "Rethinking the Value of Network Pruning" (ICLR 2019; anchor
Eric-mingjie/rethinking-network-pruning). **Claim**: for structured pruning, training the pruned architecture
from a random init (Scratch-E: same epochs; Scratch-B: same FLOPs) matches or beats fine-tuning the pruned
model; for unstructured (weight-level) pruning scratch training can match on small data sets but falls short at
high sparsity on large ones.

**Setting** (`benchmarks/fidelity_pruning.py`, `weightlab.compress.rethinking`, {C.today()}): the anchor's CIFAR
recipe shape (SGD lr 0.1, momentum 0.9, wd 1e-4, lr x0.1 at 50% and 75% of the epochs, batch 64) for the large
model and the scratch runs: E = {args.mlp_epochs} epochs (MLP on MNIST-1D) and {args.cnn_epochs} (SmallCNN on
digits). Pruning: L1-norm channel pruning (Li et al.; the network is rebuilt with fewer hidden units /
filters per layer, head kept) or global magnitude masks (held during training). Fine-tuning: lr 1e-3 constant
(the schedule's last), E/4 epochs (the anchor's 40 of 160) and E epochs (equal epochs). Scratch-B epochs:
int(E x FLOPs(large)/FLOPs(pruned)) uncapped, as in the anchor's CIFAR code. "params": parameters of the
pruned network (channels) or kept weights (masks). Test accuracy, mean ± sd over seeds
{', '.join(map(str, args.seeds))}. {load} {cpu:.0f} CPU s in all.

{C.md_table(["setting, pruning", "params", "large", "pruned, no training"] + arms, rows)}

Verdict: {head} — Scratch-B is within 0.5 point of or above the better fine-tune in {won} of {len(struct)}
structured settings (mean over seeds). {unstr_line}
{lines}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["spdf", "rethinking"], default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--spdf-epochs", type=int, default=10)
    ap.add_argument("--ft-epochs", type=int, default=30)
    ap.add_argument("--ft-per-class", type=int, default=40)
    ap.add_argument("--mlp-epochs", type=int, default=40)
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--runs", default=None, help="folder for per-seed JSON: with --worker, write one seed there; "
                                                 "without, read every seed from there instead of running")
    ap.add_argument("--worker", action="store_true", help="run --only for each --seeds and write JSON to --runs")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    for what, fn, title, section in (("spdf", spdf_seed, SPDF_TITLE, spdf_section),
                                     ("rethinking", rethink_seed, RETHINK_TITLE, rethink_section)):
        if args.only not in (None, what):
            continue
        runs_dir = Path(args.runs) if args.runs else None
        if runs_dir is not None and not args.worker:
            # aggregate seeds run by separate worker processes (one per seed, in parallel)
            recs = [json.loads((runs_dir / f"{what}-seed{s}.json").read_text()) for s in args.seeds]
            runs = [r["result"] for r in recs]
            loads = [x for r in recs for x in r["loads"]]
            cpu = sum(r["cpu_s"] for r in recs)
        else:
            loads, t0, runs = [os.getloadavg()[0]], time.process_time(), []
            for s in args.seeds:
                t1 = time.process_time()
                runs.append(fn(s, args))
                loads.append(os.getloadavg()[0])
                if args.worker:
                    runs_dir.mkdir(parents=True, exist_ok=True)
                    (runs_dir / f"{what}-seed{s}.json").write_text(json.dumps(
                        {"result": runs[-1], "loads": [loads[0], loads[-1]], "cpu_s": time.process_time() - t1}))
            cpu = time.process_time() - t0
        if args.worker:
            continue
        body = section(runs, args, C.load_sentence(loads), cpu)
        print(body)
        if not args.no_write:
            C.write_section(title, body)


if __name__ == "__main__":
    main()
