"""Fidelity row for the self-supervised prototype metric (Sorscher et al., "Beyond neural scaling laws", NeurIPS 2022).

    nice .venv/bin/python benchmarks/fidelity_prototype.py                       # digits, mnist1d, 2 text sets
    nice .venv/bin/python benchmarks/fidelity_prototype.py --sets digits --seeds 2    # smoke
    # as run for RESULTS.md (two processes side by side, then one report):
    nice .venv/bin/python benchmarks/fidelity_prototype.py --sets digits newsgroup polarity --json /tmp/fp_a.json &
    nice .venv/bin/python benchmarks/fidelity_prototype.py --sets mnist1d --json /tmp/fp_b.json; wait
    .venv/bin/python benchmarks/fidelity_prototype.py --report /tmp/fp_a.json /tmp/fp_b.json

The paper's claims tested here:
 (i) the self-supervised prototype metric (k-means on SwAV embeddings, score = cosine distance to the nearest
     centroid) prunes about as well as the best supervised metrics (memorization, EL2N, forgetting) and better
     than random, without labels;
 (ii) the best policy depends on how much data is kept: keep the hardest examples when data is abundant, the
     easiest when it is scarce.
Offline stand-ins: sklearn digits (1347 train / 450 test) and MNIST-1D (4000 / 1000) with weightlab's SimCLR
encoder trained on the training split (no labels), plus two 200-example text sets from gensim (mini_newsgroup:
alt.atheism vs sci.space with headers stripped; pang_lee_polarity: movie-review sentiment) with mean-pooled
MiniLM embeddings. Per seed, every metric scores the full training split, a kept fraction (10/30/50/70/90 %)
is chosen by policy (hard = highest scores, easy = lowest, random), and a fresh classifier trained only on it is
evaluated on the untouched test split: the zoo MLP (64-64, Adam 3e-3, 600 steps of batch 64) on images; a
logistic regression on the frozen MiniLM embeddings (Adam 1e-2, 300 full-batch steps, wd 1e-3) on texts.
Metrics: prototype on SSL embeddings (the method), prototype on raw features (ablation), EL2N (5 runs x 2
epochs) and forgetting (5 runs x 20 epochs; images only) - library defaults - and random. k = number of classes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import statistics
import time
import zlib
from pathlib import Path

import torch
from torch.nn import functional as F

from weightlab import data as D
from weightlab import zoo
from weightlab.data.ssl_encoder import minilm_embeddings
from weightlab.data.table import keep_indices

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
IMAGE_METRICS = ("prototype-ssl", "prototype-raw", "el2n", "forgetting")
TEXT_METRICS = ("prototype-minilm", "el2n")


# ----------------------------------------------------------------------------- data

def _gensim_dir() -> str:
    import gensim

    return os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")


def newsgroup_texts() -> tuple[list[str], torch.Tensor]:
    class _Bunch(pickle.Unpickler):  # an old sklearn Bunch: a dict subclass, read back as a dict
        def find_class(self, module, name):
            return dict if module.startswith("sklearn") else super().find_class(module, name)

    raw = Path(_gensim_dir(), "mini_newsgroup").read_bytes()
    b = _Bunch(io.BytesIO(zlib.decompress(raw))).load()
    # drop the mail headers: "Newsgroups: alt.atheism" would give the label away
    texts = [t.split("\n\n", 1)[1] if "\n\n" in t else t for t in b["data"]]
    return [" ".join(t.split()) for t in texts], torch.tensor(list(b["target"]), dtype=torch.long)


def polarity_texts() -> tuple[list[str], torch.Tensor]:
    lines = Path(_gensim_dir(), "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    rows = [ln.split(" ", 1) for ln in lines if ln.strip()]
    return [t.strip() for _, t in rows], torch.tensor([int(lab == "__label__pos") for lab, _ in rows])


def stratified_half(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        tr.append(idx[: len(idx) // 2])
        te.append(idx[len(idx) // 2:])
    return torch.cat(tr).sort().values, torch.cat(te).sort().values


# ----------------------------------------------------------------------------- classifiers

def train_mlp(x, y, classes, seed, steps=600, batch=64):
    torch.manual_seed(seed)
    model = zoo.MLP(x.shape[1], (64, 64), classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_logreg(x, y, classes, seed, steps=300):
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- one seed

def image_scores(d: D.ScoringData, seed: int) -> tuple[dict, dict]:
    out, secs = {}, {}
    for name, method, params in (("prototype-ssl", "prototype", {"seed": seed}),
                                 ("prototype-raw", "prototype", {"seed": seed, "encoder": "raw"}),
                                 ("el2n", "el2n", {"seed": 100 * seed}),
                                 ("forgetting", "forgetting", {"seed": 100 * seed})):
        t = D.score_dataset(method, d, show_progress=False, **params)
        out[name], secs[name] = t.scores, t.seconds
    return out, secs


def run_policies(scores, x_tr, y_tr, x_te, y_te, classes, seed, train) -> dict[str, float]:
    res = {"full": accuracy(train(x_tr, y_tr, classes, seed), x_te, y_te)}
    for f in FRACTIONS:
        arms = [("random", None, "random")] + [(m, s, p) for m, s in scores.items() for p in ("hard", "easy")]
        for metric, s, policy in arms:
            idx = keep_indices(s if s is not None else torch.zeros(len(y_tr)), f, policy, seed=seed)
            key = f"{metric}/{policy}/{f}" if metric != "random" else f"random/{f}"
            res[key] = accuracy(train(x_tr[idx], y_tr[idx], classes, seed), x_te, y_te)
    return res


def image_set(name: str, seeds: int) -> dict:
    ds = zoo.digits(seed=0) if name == "digits" else zoo.mnist1d()
    d = D.ScoringData.from_dataset(ds)
    runs, times = [], []
    for seed in range(seeds):
        scores, secs = image_scores(d, seed)
        times.append(secs)
        runs.append(run_policies(scores, d.x, d.y, ds.x_test, ds.y_test, ds.num_classes, seed, train_mlp))
        print(f"{name} seed {seed}: full {runs[-1]['full']:.3f}  score seconds "
              + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()), flush=True)
    return {"runs": runs, "score_seconds": times, "train": len(d), "test": len(ds.y_test),
            "metrics": list(IMAGE_METRICS)}


def text_set(name: str, seeds: int, minilm) -> dict:
    texts, y = newsgroup_texts() if name == "newsgroup" else polarity_texts()
    emb = minilm_embeddings(texts, model=minilm[0], tokenizer=minilm[1])
    runs = []
    for seed in range(seeds):
        tr, te = stratified_half(y, seed)
        mu, sd = emb[tr].mean(0), emb[tr].std(0) + 1e-6
        x_tr, x_te = (emb[tr] - mu) / sd, (emb[te] - mu) / sd
        d = D.ScoringData(x_tr, y[tr], 2, name)
        scores = {"prototype-minilm": D.score_dataset("prototype", d, embeddings=emb[tr], seed=seed).scores,
                  "el2n": D.score_dataset("el2n", d, seed=100 * seed, show_progress=False).scores}
        runs.append(run_policies(scores, x_tr, y[tr], x_te, y[te], 2, seed, train_logreg))
    print(f"{name}: {len(texts)} texts, full accuracy {statistics.mean(r['full'] for r in runs):.3f}", flush=True)
    return {"runs": runs, "train": len(texts) // 2, "test": len(texts) - len(texts) // 2, "metrics": list(TEXT_METRICS)}


# ----------------------------------------------------------------------------- report

def summarise(res: dict) -> dict:
    runs = res["runs"]
    keys = runs[0].keys()
    return {k: (statistics.mean(r[k] for r in runs), statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0)
            for k in keys}


def table(name: str, res: dict) -> str:
    s = summarise(res)
    arms = ["random"] + [f"{m}/{p}" for m in res["metrics"] for p in ("hard", "easy")]
    lines = [f"| {name} | " + " | ".join(f"{int(f * 100)} %" for f in FRACTIONS) + " |",
             "|---|" + "---|" * len(FRACTIONS)]
    for arm in arms:
        cells = [f"{100 * s[f'{arm}/{f}'][0]:.1f} ± {100 * s[f'{arm}/{f}'][1]:.1f}" for f in FRACTIONS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    full = s["full"]
    lines.append(f"| (all data) | {100 * full[0]:.1f} ± {100 * full[1]:.1f} |" + " |" * (len(FRACTIONS) - 1))
    return "\n".join(lines)


def paired(res: dict, a: str, b: str, f: float) -> tuple[float, float]:
    """Mean and standard error of the per-seed accuracy difference a - b at kept fraction f."""
    diffs = [r[f"{a}/{f}"] - r[f"{b}/{f}"] for r in res["runs"]]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return statistics.mean(diffs), se


def verdict_lines(name: str, res: dict, method: str, supervised: list[str]) -> list[str]:
    out = []
    for f in FRACTIONS:
        best_policy = max(("hard", "easy"), key=lambda p: summarise(res)[f"{method}/{p}/{f}"][0])
        m = f"{method}/{best_policy}"
        sup = max((f"{s}/{p}" for s in supervised for p in ("hard", "easy")),
                  key=lambda a: summarise(res)[f"{a}/{f}"][0])
        d_rand, se_rand = paired(res, m, "random", f)
        d_sup, se_sup = paired(res, m, sup, f)
        d_he, se_he = paired(res, f"{method}/hard", f"{method}/easy", f)
        out.append(f"{name} {int(f * 100)} %: {m} - random = {100 * d_rand:+.1f} ± {100 * se_rand:.1f}; "
                   f"- best supervised ({sup}) = {100 * d_sup:+.1f} ± {100 * se_sup:.1f}; "
                   f"hard - easy = {100 * d_he:+.1f} ± {100 * se_he:.1f} (points, ± s.e. over seeds)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["digits", "mnist1d", "newsgroup", "polarity"])
    ap.add_argument("--seeds", type=int, default=5, help="seeds for the image sets")
    ap.add_argument("--splits", type=int, default=10, help="random 50/50 splits for the text sets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="/tmp/fidelity_prototype.json")
    ap.add_argument("--report", nargs="+", default=None, help="only print the tables of these JSON outputs "
                                                               "(e.g. of runs done in parallel)")
    args = ap.parse_args()
    if args.report:
        for path in args.report:
            report({k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")})
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out, minilm = {}, None
    for name in args.sets:
        if name in ("digits", "mnist1d"):
            out[name] = image_set(name, args.seeds)
        else:
            minilm = minilm or zoo.load_minilm()
            out[name] = text_set(name, args.splits, minilm)
    report(out)
    out["_meta"] = {"seconds": time.time() - t0, "cpu_seconds": time.process_time(), "threads": args.threads,
                    "load": os.getloadavg(), "seeds": args.seeds, "splits": args.splits}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{time.time() - t0:.0f} s wall, {time.process_time():.0f} s CPU; load {os.getloadavg()}; "
          f"wrote {args.json}")


def report(out: dict) -> None:
    for name, res in out.items():
        print(f"\n{table(name, res)}\n")
        method = "prototype-ssl" if name in ("digits", "mnist1d") else "prototype-minilm"
        sup = ["el2n", "forgetting"] if name in ("digits", "mnist1d") else ["el2n"]
        res["verdict_lines"] = verdict_lines(name, res, method, sup)
        print("\n".join(res["verdict_lines"]))


if __name__ == "__main__":
    main()
