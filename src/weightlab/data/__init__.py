"""Data family: score and reweight training samples. Methods register themselves on import (one file per method)."""
