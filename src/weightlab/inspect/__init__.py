"""Inspect family: what is in a model's weights. Each method registers itself on import."""
from . import stats  # noqa: F401
