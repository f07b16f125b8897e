"""Compress family: make weights smaller. Each method registers itself on import."""
from . import cast  # noqa: F401
