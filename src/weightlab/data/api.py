"""One call to score a dataset by method name: score_dataset("el2n", "digits", runs=5)."""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import get_method
from .table import ScoreTable

SCORE_METHODS = ("el2n", "grand", "forgetting", "prototype")


def score_dataset(method: str, data, *, show_progress: bool | None = None, device=None, **params) -> ScoreTable:
    """Score every sample of `data` (zoo name, CSV path, zoo Dataset, ScoringData) with a registered score.

    `params` are the method's config fields (unknown ones are errors); method-specific keyword
    arguments such as `model_fn` or `embeddings` go through `params` too. `device` ('auto', 'cpu',
    'cuda', 'cuda:N', 'mps'; None = the CPU) is where the models train / k-means runs.
    """
    spec = get_method("data", method)
    if spec.kind != "score":
        raise ConfigError(f"data/{spec.name} is not a per-sample score; scores are: {', '.join(SCORE_METHODS)}")
    kwargs = {k: params.pop(k) for k in ("model_fn", "embeddings") if k in params}
    cfg = spec.make_config(params)
    if device is not None:
        from ..engine.device import resolve_device

        kwargs["device"] = device if method == "prototype" else resolve_device(device)
    return spec.fn(data, cfg, show_progress=show_progress, **kwargs)
