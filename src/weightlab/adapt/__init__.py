"""Adapt family: trainable structure on weights. Methods register themselves on import (one file per method)."""
