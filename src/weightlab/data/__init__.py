"""Data family: score and reweight training samples. Methods register themselves on import (one file per method).

Scores (one number per sample, higher = harder / more atypical / more likely mislabeled):
`el2n`, `grand`, `forgetting`, `prototype` -> ScoreTable (CSV / JSON / Parquet, histogram,
`keep(fraction, policy)`). Reweighting inside any training loop: `LossReweighter`
(loss-reweight), `DROReweighter` (dro), `LDRKLLoss` / `ALDRKLLoss` (ldr-kl, aldr-kl).
"""
from . import done, dro, el2n, forgetting, grand, ldr, loss_reweight, prototype  # noqa: F401  (register)
from ._data import ScoringData, inject_label_noise, load_scoring_data, read_csv_data
from .api import SCORE_METHODS, score_dataset
from .done import DONEConfig, pgd_attack, robust_accuracy, train_done
from .dro import DROConfig, DROReweighter
from .el2n import El2nConfig, el2n_scores
from .forgetting import ForgettingConfig, ForgettingTracker
from .grand import GrandConfig, grand_scores
from .ldr import ALDRKLConfig, ALDRKLLoss, LDRKLConfig, LDRKLLoss
from .loss_reweight import LossReweightConfig, LossReweighter
from .prototype import PrototypeConfig
from .table import POLICIES, ScoreTable, keep_indices

__all__ = [
    "ALDRKLConfig", "ALDRKLLoss", "DONEConfig", "DROConfig", "DROReweighter", "El2nConfig", "ForgettingConfig",
    "ForgettingTracker", "GrandConfig", "LDRKLConfig", "LDRKLLoss", "LossReweightConfig", "LossReweighter",
    "POLICIES", "PrototypeConfig", "SCORE_METHODS", "ScoreTable", "ScoringData", "el2n_scores", "grand_scores",
    "inject_label_noise", "keep_indices", "load_scoring_data", "pgd_attack", "read_csv_data",
    "robust_accuracy", "score_dataset", "train_done",
]
