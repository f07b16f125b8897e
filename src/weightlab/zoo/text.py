"""Real English text for calibration and perplexity: 106 Wikipedia articles from gensim.

gensim ships a shortened Wikipedia dump in its test data. The split protocol is fixed
(see the data protocol in the design notes) so that numbers from different runs and
different methods are comparable:

- parse with extract_pages + filter_wiki; drop redirects and articles under 200 chars;
  strip leftover ''/''' markup; sort by title -> 106 articles;
- "calib" = the first 85 (about 2.66 M characters),
- "heldout" = the last 21, "Asia" ... "Transport in Angola" (about 0.41 M characters).

Extraction takes a few seconds, so the articles are cached as JSON in cache_dir().
"""
from __future__ import annotations

import bz2
import json
import re

from weightlab.errors import ConfigError
from weightlab.zoo._cache import cache_dir, write_json_atomic
from weightlab.zoo._deps import package_dir, require

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
N_ARTICLES, N_CALIB = 106, 85
MIN_CHARS = 200
SPLITS = ("calib", "heldout", "all")
_CACHE_NAME = "wiki-articles-v1.json"
_PURPOSE = "Wikipedia text (weightlab.zoo.wiki_text)"
_MARKUP = re.compile(r"'{2,}")  # ''italic'' and '''bold''' survive filter_wiki


def _extract() -> list[tuple[str, str]]:
    dump = package_dir("gensim", _PURPOSE) / "test" / "test_data" / DUMP
    wikicorpus = require("gensim.corpora.wikicorpus", _PURPOSE)
    articles = []
    with bz2.open(dump, "rb") as fh:
        for title, raw, *_ in wikicorpus.extract_pages(fh):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = _MARKUP.sub("", wikicorpus.filter_wiki(raw)).strip()
            if len(text) >= MIN_CHARS:
                articles.append((title, text))
    articles.sort()
    if len(articles) != N_ARTICLES:
        raise ConfigError(f"expected {N_ARTICLES} articles in gensim's {DUMP}, got {len(articles)}; "
                          "this gensim version ships different test data")
    return articles


def _all_articles() -> list[tuple[str, str]]:
    path = cache_dir() / _CACHE_NAME
    try:
        articles = [tuple(a) for a in json.loads(path.read_text(encoding="utf-8"))]
        if len(articles) == N_ARTICLES:
            return articles
    except (OSError, ValueError, TypeError):
        pass  # missing or damaged cache: rebuild it
    articles = _extract()
    write_json_atomic(path, articles)
    return articles


def wiki_articles(split: str = "calib") -> list[tuple[str, str]]:
    """(title, text) pairs of one split, sorted by title."""
    if split not in SPLITS:
        raise ConfigError(f"wiki split must be one of {', '.join(SPLITS)}; got {split!r}")
    articles = _all_articles()
    if split == "calib":
        return articles[:N_CALIB]
    if split == "heldout":
        return articles[N_CALIB:]
    return articles


def wiki_text(split: str = "calib") -> str:
    """The articles of one split as one string, joined by blank lines."""
    return "\n\n".join(text for _, text in wiki_articles(split))
