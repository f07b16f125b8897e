"""Alignment and learned merges on zoo classifiers (a few minutes on 2 CPU cores).

1. Pairs of classifiers trained from different seeds (digits MLP, digits SmallCNN with
   BatchNorm, mnist1d MLP): barrier and midpoint accuracy of the linear path before and
   after weight matching (25 points; BatchNorm statistics re-estimated at every point).
2. Merging those pairs: plain average, permute-and-average, PLeaS at the size of one model
   and at 1.5x, PLeaS-free (fitted on public natural-image patches instead of digits), and
   the output ensemble (2x), with parameter counts.
3. Fine-tunes of one digits MLP on 4 class subsets: task arithmetic (lambda picked on a
   validation split) vs aTLAS trained on 300 labelled samples, and on the same samples
   unlabelled (entropy).

The anchor for every row is the method the paper compares with (naive path, averaging,
ensemble, task arithmetic), computed in the same run on the same models and data.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, md_table, today, write_section  # noqa: E402

from weightlab.align import connectivity, interpolate, permuted_copy, pleas, ratio_for_budget, reset_batchnorm  # noqa: E402
from weightlab.align.atlas import AtlasConfig, atlas  # noqa: E402
from weightlab.align.matching import match  # noqa: E402
from weightlab.engine.evaluators import ClassificationEvaluator  # noqa: E402
from weightlab.zoo import accuracy, digits_finetunes, load_dataset, trained_classifier  # noqa: E402

PAIRS = [("digits", "mlp"), ("digits", "cnn"), ("mnist1d", "mlp")]


def public_patches(n: int = 2000, seed: int = 0) -> torch.Tensor:
    """8x8 grey patches of scikit-learn's two bundled photos, scaled to the digits range 0..16."""
    from sklearn.datasets import load_sample_images

    g = torch.Generator().manual_seed(seed)
    imgs = [torch.tensor(im, dtype=torch.float32).mean(-1) for im in load_sample_images().images]
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        # 32x32 window pooled to 8x8, so a patch holds shapes at about the scale of a digit
        r = int(torch.randint(0, im.shape[0] - 32, (1,), generator=g))
        c = int(torch.randint(0, im.shape[1] - 32, (1,), generator=g))
        p = torch.nn.functional.avg_pool2d(im[r:r + 32, c:c + 32][None, None], 4)[0, 0]
        p = (p - p.min()) / (p.max() - p.min() + 1e-6) * 16
        out.append(p.flatten())
    return torch.stack(out)


def _acc(m, d):
    return accuracy(m, d.x_test, d.y_test)


def section_connectivity():
    rows, merge_rows = [], []
    for ds, kind in PAIRS:
        d = load_dataset(ds)
        a, b = trained_classifier(ds, kind, 0), trained_classifier(ds, kind, 1)
        ev = ClassificationEvaluator(d.x_test, d.y_test)
        bn = d.x_train if kind == "cnn" else None
        t = time.perf_counter()
        res = connectivity(a, b, ev, points=25, bn_data=bn)
        secs = time.perf_counter() - t
        mr = match(a, b)
        an = res.analysis
        rows.append([f"{ds} {kind}", f"{_acc(a, d):.3f} / {_acc(b, d):.3f}",
                     f"{res.before.barrier['loss']['reference']:.3f}", f"{res.after.barrier['loss']['reference']:.3f}",
                     f"{res.before.midpoint()['accuracy']:.3f}", f"{res.after.midpoint()['accuracy']:.3f}",
                     f"{an['distance_ratio']:.2f}", f"{an['overlap_before']:.2f} -> {an['overlap_after']:.2f}",
                     f"{mr.seconds:.2f}", f"{secs:.1f}"])
        # merges at equal size
        aligned = permuted_copy(b, mr.spec, mr.perms)
        avg, pavg = _blend(a, b, bn), _blend(a, aligned, bn)
        x_fit = d.x_train
        p0 = pleas(a, b, x_fit, ratio=0.0)
        r15 = ratio_for_budget(a, 1.5)
        p15 = pleas(a, b, x_fit, ratio=r15)
        nparams = sum(p.numel() for p in a.parameters())
        with torch.no_grad():
            ens = ((a(d.x_test) + b(d.x_test)).argmax(1) == d.y_test).float().mean().item()
        row = [f"{ds} {kind}", f"{max(_acc(a, d), _acc(b, d)):.3f}", f"{_acc(avg, d):.3f}", f"{_acc(pavg, d):.3f}",
               f"{_acc(p0.model, d):.3f} ({p0.params / nparams:.2f}x)",
               f"{_acc(p15.model, d):.3f} ({p15.params / nparams:.2f}x)"]
        if ds == "digits":
            pf = pleas(a, b, public_patches(), ratio=0.0)
            row.append(f"{_acc(pf.model, d):.3f}")
        else:
            row.append("n/a")
        row.append(f"{ens:.3f} (2x)")
        merge_rows.append(row)
        print(rows[-1], merge_rows[-1], flush=True)
    return rows, merge_rows


def _blend(a, b, bn_data):
    m = type(a).__new__(type(a))
    import copy

    m = copy.deepcopy(a)
    m.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.5))
    if bn_data is not None:
        reset_batchnorm(m, bn_data)
    return m.eval()


def section_atlas():
    d = load_dataset("digits")
    base, fts = digits_finetunes("mlp")
    n_fit = 300
    fit = ClassificationEvaluator(d.x_train[:n_fit], d.y_train[:n_fit])
    val = ClassificationEvaluator(d.x_train[n_fit:], d.y_train[n_fit:])
    rows = [["base", f"{_acc(base, d):.3f}", "-"]]
    rows += [[f"fine-tune {i}", f"{_acc(m, d):.3f}", "-"] for i, m in enumerate(fts)]
    import copy

    work = copy.deepcopy(base)
    best = None
    sd0 = base.state_dict()
    for lam in [i / 10 for i in range(1, 11)]:
        work.load_state_dict({k: sd0[k] + lam * sum(f.state_dict()[k] - sd0[k] for f in fts) for k in sd0})
        v = val(work)["accuracy"]
        if best is None or v > best[0]:
            best = (v, lam, _acc(work, d))
    rows.append([f"task arithmetic (lambda={best[1]:.1f} on validation)", f"{best[2]:.3f}", "1"])
    for label, cfg in [("aTLAS, 300 labelled", AtlasConfig()),
                       ("aTLAS x4 partitions, 300 labelled", AtlasConfig(partitions=4)),
                       ("aTLAS, 300 unlabelled (entropy)", AtlasConfig(objective="entropy")),
                       # 20 epochs of 300 samples are only 60 steps at lr 1e-3: coefficients barely leave 0
                       ("aTLAS, 300 labelled, lr 1e-2, 400 steps", AtlasConfig(lr=1e-2, steps=400)),
                       ("aTLAS, 300 unlabelled, lr 1e-2, 400 steps", AtlasConfig(objective="entropy", lr=1e-2,
                                                                                steps=400))]:
        t = time.perf_counter()
        res = atlas(base, fts, fit, cfg)
        work.load_state_dict(res.state_dict)
        rows.append([label, f"{_acc(work, d):.3f}", f"{res.coefficients.numel()} ({time.perf_counter() - t:.1f} s)"])
        print(rows[-1], flush=True)
    return rows


def main():
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    conn, merges = section_connectivity()
    at = section_atlas()
    body = [f"{today()}; {machine_line()}; total {time.perf_counter() - t0:.0f} s (single thread).", "",
            "Pairs of zoo classifiers trained from seeds 0 and 1. Barrier = max_l L(l) - (L(0)+L(1))/2 on test "
            "cross-entropy (the git-re-basin definition; `weightlab connect` also reports the height above the "
            "chord); 25 points, BatchNorm statistics re-estimated on the training inputs at every point. Overlap: "
            "mean shared top-8 left singular subspace per layer (Ito et al.); distance ratio ||A - pi(B)|| / "
            "||A - B||.", "",
            md_table(["pair", "test acc A / B", "barrier naive", "barrier aligned", "midpoint acc naive",
                      "midpoint acc aligned", "distance ratio", "top-8 overlap", "matching s", "path s"], conn), "",
            "Merging the same pairs (test accuracy; size relative to one model). PLeaS: activation matching, "
            "closed-form masked least squares on the training inputs; PLeaS-free: fitted on 8x8 patches of "
            "scikit-learn's two sample photos instead of digits. mnist1d inputs are 1-D signals: no public "
            "stand-in here.", "",
            md_table(["pair", "best single", "average", "permute + average", "PLeaS 1x", "PLeaS 1.5x",
                      "PLeaS-free 1x", "output ensemble"], merges), "",
            "Digits MLP base (2 epochs on all classes) fine-tuned on 4 class subsets; test accuracy on all 10 "
            "classes. Task arithmetic picks lambda on 1137 held-out training samples; aTLAS (paper defaults: "
            "AdamW lr 1e-3, wd 0.1, batch 128, 20 epochs) fits one coefficient per task vector and tensor on the "
            "first 300 training samples (60 steps); the last two rows are not paper defaults.", "",
            md_table(["model", "test acc", "learned coefficients"], at)]
    write_section("Align: weight matching, connectivity, PLeaS, aTLAS (benchmarks/align.py)", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
