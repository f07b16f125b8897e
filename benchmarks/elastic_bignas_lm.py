"""The transformer part of benchmarks/elastic_bignas.py (run through it: each job in its own process).

Claim at this scale: children of one BigNAS char-level transformer supernet (widths 0.25-1.0 x every block's
heads and MLP units, all 4 blocks; and the smallest child) reach the held-out bits per character of the same
architectures trained alone with the same recipe and the same number of steps. Tolerance: 1% of the stand-alone
bits/char (about 0.03 bits), a level a reader would call "the same model".
"""
from __future__ import annotations

import statistics
import time

from _common import load_sentence, machine_line, md_table, package_version, today

SEEDS = (0, 1, 2)
EPOCHS, BATCH, WARMUP = 1, 16, 0.2  # 390 steps of 16 windows x 64 characters: a few CPU minutes for all jobs
TEST_WINDOWS = 1600  # the first 102,400 characters of the held-out articles (the CLI's eval scores all 412k)
WIDTHS = (0.25, 0.5, 0.75, 1.0)
TOL = 0.01  # relative bits/char


def _setup(seed: int):
    import torch

    from weightlab.elastic.bignas import BigNASConfig
    from weightlab.elastic.bignas_io import load_split

    torch.set_num_threads(1)
    split = load_split("text")
    split.x_test, split.y_test = split.x_test[:TEST_WINDOWS], split.y_test[:TEST_WINDOWS]
    return split, BigNASConfig(net="lm", epochs=EPOCHS, batch_size=BATCH, warmup_epochs=WARMUP, seed=seed)


def _children(net):
    kids = {f"width {w}": net.uniform_child(w) for w in WIDTHS}
    kids["smallest"] = net.min_child()
    return kids


def job_supernet(seed: int, inplace_kd: bool = True) -> dict:
    """One supernet; inplace_kd=False is the ablation (every child trained on the labels)."""
    from weightlab.elastic.bignas import train_bignas
    from weightlab.elastic.bignas_lm import evaluate_lm

    split, cfg = _setup(seed)
    cfg = cfg.model_copy(update={"inplace_kd": inplace_kd})
    t0 = time.perf_counter()
    res = train_bignas(split, cfg)
    train_s, net, out = time.perf_counter() - t0, res.net, {}
    for name, child in _children(net).items():
        net.set_child(child)
        d = evaluate_lm(net, split.x_test, split.y_test)
        out[name] = {"bpc": d["bits_per_char"], "acc": d["accuracy"], "params": net.child_params(child),
                     "child": child.as_dict()}
    return {"children": out, "train_s": train_s, "config": cfg.model_dump(), "history": res.history}


def _train_alone(child, cfg, split, seed: int, head_dim: int, d_model: int):
    """The child's architecture as its own ElasticLM (its largest child is exactly it, same init rule), trained
    on the labels with the supernet's recipe: optimizer, LR rule, steps, batch, dropout, label smoothing."""
    import torch
    import torch.nn.functional as F

    from weightlab.elastic.bignas import bignas_lr, make_optimizer
    from weightlab.elastic.bignas_lm import ElasticLM

    d = child.depths[0]
    torch.manual_seed(seed)
    net = ElasticLM(split.num_classes, split.x_train.shape[1], d_model, d, child.heads[0], child.widths[0],
                    head_dim, dropout=cfg.dropout)
    assert net.child_arch(net.max_child())["heads"] == list(child.heads[:d])
    opt = make_optimizer(net, cfg)
    gen = torch.Generator().manual_seed(seed)
    x, y = split.x_train, split.y_train
    steps = len(y) // cfg.batch_size
    net.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y), generator=gen)
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = bignas_lr(epoch + s / steps, cfg)
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]).flatten(0, 1), y[idx].reshape(-1),
                            label_smoothing=cfg.label_smoothing).backward()
            opt.step()
    return net.eval()


def job_alone(seed: int) -> dict:
    from weightlab.elastic.bignas import make_supernet
    from weightlab.elastic.bignas_lm import evaluate_lm

    split, cfg = _setup(seed)
    shape = make_supernet(cfg, split.x_train.shape[1], split.num_classes)
    out, t0 = {}, time.perf_counter()
    for name, child in _children(shape).items():
        t1 = time.perf_counter()
        net = _train_alone(child, cfg, split, seed, shape.head_dim, shape.d_model)
        d = evaluate_lm(net, split.x_test, split.y_test)
        out[name] = {"bpc": d["bits_per_char"], "acc": d["accuracy"], "params": net.child_params(net.max_child()),
                     "train_s": time.perf_counter() - t1}
    return {"children": out, "train_s": time.perf_counter() - t0}


def ngram_levels() -> dict:
    """Bits/char of count models of the training text on the same test characters: unigram and bigram
    (add-0.5 smoothing), the levels that tell how far a few hundred steps get."""
    import numpy as np

    split, _ = _setup(0)
    x, y = split.x_train.reshape(-1).numpy(), split.y_train.reshape(-1).numpy()
    tx, ty = split.x_test.reshape(-1).numpy(), split.y_test.reshape(-1).numpy()
    v = split.num_classes
    uni = np.bincount(y, minlength=v) + 0.5
    big = np.full((v, v), 0.5)
    np.add.at(big, (x, y), 1)
    return {"unigram": float(-np.log2(uni[ty] / uni.sum()).mean()),
            "bigram": float(-np.log2(big[tx, ty] / big[tx].sum(1)).mean())}


def _ms(v: list[float], k: int = 3) -> str:
    return f"{statistics.mean(v):.{k}f} ± {statistics.stdev(v):.{k}f}" if len(v) > 1 else f"{v[0]:.{k}f}"


def report(sup: dict, alone: dict, total_s: float, heading: str, nokd: dict | None = None) -> str:
    names = list(sup[SEEDS[0]]["children"])
    rows, verdicts, abl = [], [], []
    for n in names:
        if nokd:
            b_n = [nokd[s]["children"][n]["bpc"] - alone[s]["children"][n]["bpc"] for s in SEEDS]
            abl.append((n, statistics.mean(b_n), statistics.stdev(b_n),
                        TOL * statistics.mean(alone[s]["children"][n]["bpc"] for s in SEEDS)))
        b_s = [sup[s]["children"][n]["bpc"] for s in SEEDS]
        b_a = [alone[s]["children"][n]["bpc"] for s in SEEDS]
        diff = [x - y for x, y in zip(b_s, b_a)]
        acc = [100 * (sup[s]["children"][n]["acc"] - alone[s]["children"][n]["acc"]) for s in SEEDS]
        m, tol = statistics.mean(diff), TOL * statistics.mean(b_a)
        verdicts.append("within 1%" if abs(m) <= tol else ("supernet better" if m < 0 else "supernet WORSE"))
        c = sup[SEEDS[0]]["children"][n]["child"]
        d = c["depths"][0]
        rows.append([n, f"heads {c['heads'][:d]}, MLP {c['widths'][:d]}", f"{sup[SEEDS[0]]['children'][n]['params']:,}",
                     _ms(b_s), _ms(b_a), _ms(diff), _ms(acc, 1), verdicts[-1]])
    loads = [x for d in list(sup.values()) + list(alone.values()) for x in d["loads"]]
    sw, aw = [sup[s]["wall_s"] for s in SEEDS], [alone[s]["wall_s"] for s in SEEDS]
    sc, ac = [sup[s]["cpu_s"] for s in SEEDS], [alone[s]["cpu_s"] for s in SEEDS]
    cfg = sup[SEEDS[0]]["config"]
    worse = sum(v == "supernet WORSE" for v in verdicts)
    verdict = ("reproduced at this budget: no child is more than 1% worse than its stand-alone twin" if not worse
               else f"NOT reproduced at this budget: {worse} of {len(verdicts)} children more than 1% worse than "
               f"their stand-alone twins ({sum(v == 'within 1%' for v in verdicts)} within 1%, "
               f"{sum(v == 'supernet better' for v in verdicts)} better)")
    alone_mean = [statistics.mean(alone[s]["children"][n]["bpc"] for s in SEEDS) for n in names]
    sup_mean = [statistics.mean(sup[s]["children"][n]["bpc"] for s in SEEDS) for n in names]
    lv, mx = ngram_levels(), sup[SEEDS[0]]["children"]["width 1.0"]["params"]
    spread = (f"Across sizes ({sup[SEEDS[0]]['children']['smallest']['params']:,} to {mx:,} parameters) the "
              f"stand-alone models span {max(alone_mean) - min(alone_mean):.3f} bits/char and the supernet's "
              f"children {max(sup_mean) - min(sup_mean):.3f}: at this budget capacity does not matter yet. Count "
              f"models of the training text score {lv['unigram']:.2f} (unigram) and {lv['bigram']:.2f} (bigram) "
              "bits/char on the same characters, so the stand-alone runs end at about the bigram level and the "
              "supernet's children between the two: the table compares early training, where the shared "
              "weights lag; it says nothing about converged children.")
    ablation = []
    if nokd:
        close = sum(m <= t for _, m, _, t in abl)
        why = ("so at this budget the gap above comes from distilling from a largest child that is itself still "
               "early in training" if close == len(abl) else
               f"{len(abl) - close} of {len(abl)} children stay more than 1% worse without it, so distillation "
               "does not explain the whole gap")
        ablation = [
            "Ablation, in-place distillation off (every child trained on the labels, all else equal; its own "
            f"processes, {statistics.mean(nokd[s]['cpu_s'] for s in SEEDS):.0f} s CPU per seed), bits/char minus "
            "the stand-alone twin's, paired by seed: "
            + "; ".join(f"{n} {m:+.3f} ± {sd:.3f}" for n, m, sd, _ in abl)
            + f". {close} of {len(abl)} children are within 1% (or better) without distillation; {why}.", ""]
    body = [
        heading, "",
        f"{today()}; {machine_line()}; torch {package_version('torch')}; total {total_s:.0f} s (each job in its "
        "own process, one thread). " + load_sentence(loads), "",
        f"One supernet: a pre-LN decoder-only transformer, character vocabulary of 97 (newline, printable ASCII, "
        f"unknown), context 64, embedding width 48 (fixed), 4 blocks of 4 heads x 12 dims and a GELU MLP of 192 "
        f"({mx:,} parameters); a child keeps its first 1-4 blocks and, per block, 1-4 leading heads and 48-192 "
        f"leading MLP units. Trained {cfg['epochs']} epoch(s) over the first 400,000 characters of the zoo's "
        f"Wikipedia calib split (windows of 64, batch {cfg['batch_size']}: "
        f"{cfg['epochs'] * (6249 // cfg['batch_size'])} steps) with the sandwich rule (largest + 2 random + "
        f"smallest child per step) and in-place distillation on the largest child's per-character distributions; "
        f"{cfg['optimizer']} lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, warmup "
        f"{cfg['warmup_epochs']:g} epoch then 0.97-exponential decay to a 5% floor at 70% of training, dropout "
        f"{cfg['dropout']:g} on the largest child, no label smoothing; attention output and second MLP layer "
        "zero-initialized. Stand-alone: the same architecture as its own network, same init, optimizer, LR rule, "
        "steps and dropout, labels only. Bits per character (lower is better) on the first 102,400 characters of "
        "the 21 held-out articles, mean ± std over seeds "
        f"{', '.join(map(str, SEEDS))}; differences paired by seed (bits: supernet - alone; next-character "
        "accuracy in pp: supernet - alone).", "",
        md_table(["child", "per block", "params", "bits/char in supernet", "alone", "difference",
                  "next-char acc diff (pp)", "verdict"], rows), "",
        f"Verdict: {verdict}. {spread}", "", *ablation,
        f"Cost: one supernet {statistics.mean(sw):.0f} s wall / {statistics.mean(sc):.0f} s CPU per seed vs "
        f"{statistics.mean(aw):.0f} s wall / {statistics.mean(ac):.0f} s CPU for the {len(names)} stand-alone "
        "models together (each process includes its start-up and the test evaluation).",
    ]
    return "\n".join(body)
