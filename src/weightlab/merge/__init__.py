"""Merge family: combine several models. Methods register themselves on import (one file per method)."""
