"""Demo section: prototype scores of the Wikipedia calibration windows, embedded with MiniLM."""
from __future__ import annotations

import time

WINDOW_WORDS = 100  # about 130 MiniLM tokens
NUM_WINDOWS = 256
MAX_TOKENS = 128
K = 8


def calibration_windows(num: int = NUM_WINDOWS, words: int = WINDOW_WORDS) -> list[tuple[str, str]]:
    """(article title, text) windows of `words` words cut from the calibration articles, `num` spread evenly."""
    from ..zoo import wiki_articles

    windows = []
    for title, text in wiki_articles("calib"):
        ws = text.split()
        for start in range(0, len(ws), words):
            if len(ws) - start >= words // 2:
                windows.append((title, " ".join(ws[start:start + words])))
    if len(windows) <= num:
        return windows
    step = len(windows) / num
    return [windows[int(i * step)] for i in range(num)]


def _snippet(text: str, n: int = 90) -> str:
    s = text[:n].replace("|", "/").replace("`", "'")
    return s + ("..." if len(text) > n else "")


def data_section(ctx):
    """Score the calibration windows with the self-supervised prototype metric (no labels)."""
    from ..data import score_dataset
    from ..data.ssl_encoder import minilm_embeddings
    from ..zoo import load_minilm

    t0 = time.perf_counter()
    windows = ctx.cache.get("data_windows") or calibration_windows()
    ctx.cache["data_windows"] = windows
    if "minilm" not in ctx.cache:
        ctx.cache["minilm"] = load_minilm()
    model, tok = ctx.cache["minilm"]
    emb = minilm_embeddings([w for _, w in windows], model=model, tokenizer=tok, max_tokens=MAX_TOKENS)
    t_embed = time.perf_counter() - t0
    table = score_dataset("prototype", emb, k=K)
    out = ctx.work / "data-prototype-scores.csv"
    table.extra["article"] = [t for t, _ in windows]
    table.save(out, force=True)
    plot = None
    try:
        plot = table.plot(ctx.work / "data-prototype-scores.png", force=True)
    except ImportError:  # MissingDependencyError: matplotlib is an optional extra
        pass

    order = table.rank.argsort()  # hardest first
    hardest = [int(i) for i in order[:3]]
    easiest = [int(i) for i in order.flip(0)[:3]]
    kept = table.keep(0.5, "easy")
    sizes = [int((table.extra["cluster"] == c).sum()) for c in range(K)]
    s = table.summary()
    res = {"windows": len(windows), "k": K, "embedding_dim": int(emb.shape[1]), "cluster_sizes": sizes,
           "score_median": s["median"], "score_min": s["min"], "score_max": s["max"],
           "hardest": [{"article": windows[i][0], "score": float(table.scores[i])} for i in hardest],
           "easiest": [{"article": windows[i][0], "score": float(table.scores[i])} for i in easiest],
           "kept_easy_50": int(len(kept)), "embed_seconds": round(t_embed, 1),
           "files": [out.name] + ([plot.name] if plot else [])}

    def rows(idx):
        return "\n".join(f"| {float(table.scores[i]):.3f} | {windows[i][0]} | {_snippet(windows[i][1])} |" for i in idx)

    text = (f"`data/prototype` scored {len(windows)} Wikipedia calibration windows (~{WINDOW_WORDS} words, "
            f"cut to {MAX_TOKENS} tokens) embedded with MiniLM (mean-pooled, {emb.shape[1]} dims; {t_embed:.1f} s): "
            f"k-means with k={K} on the normalised embeddings (cluster sizes {sizes}), score = cosine distance "
            f"to the nearest centroid, no labels used. Scores range {s['min']:.3f} to {s['max']:.3f} (median "
            f"{s['median']:.3f}). Keeping the most typical half (`keep(0.5, 'easy')`, the small-data policy) "
            f"would keep {len(kept)} windows. Table: `{out.name}`.\n\n"
            f"| score | article | most atypical windows |\n|---|---|---|\n{rows(hardest)}\n\n"
            f"| score | article | most typical windows |\n|---|---|---|\n{rows(easiest)}")
    return res, text
