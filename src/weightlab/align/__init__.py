"""Align family: permutation alignment of independently trained models, linear mode
connectivity, and the merges that need alignment or data (PLeaS, aTLAS).

    import weightlab as wl
    b_aligned, perms = wl.align.weight_matching(model_a, model_b)      # spec="auto"
    res = wl.align.connectivity(model_a, model_b, evaluator)           # barrier before/after
    merged = wl.align.load_model("out/pleas").model                    # folders from weightlab pleas/atlas/align
"""
from .analysis import alignment_analysis, layer_alignment
from .atlas import AtlasConfig, AtlasResult, Composition, atlas
from .connect import Connectivity, ConnectivityConfig, barriers, connectivity, interpolate, linear_path, reset_batchnorm
from .derive import resolve_spec, spec_from_module
from .models import load_model
from .matching import MatchResult, WeightMatchingConfig, match, match_state_dicts, permuted_copy, weight_matching
from .pleas import PleasConfig, PleasResult, fold_batchnorm, pleas, ratio_for_budget
from .spec import PermutationSpec, apply_permutation, invert
from .transformer import bert_spec, hf_spec, llama_spec

__all__ = [
    "AtlasConfig", "AtlasResult", "Composition", "Connectivity", "ConnectivityConfig", "PleasConfig", "PleasResult",
    "alignment_analysis", "atlas", "barriers", "connectivity", "fold_batchnorm", "interpolate", "layer_alignment",
    "linear_path", "load_model", "pleas", "ratio_for_budget", "reset_batchnorm",
    "MatchResult", "PermutationSpec", "WeightMatchingConfig", "apply_permutation", "bert_spec", "hf_spec", "invert",
    "llama_spec", "match", "match_state_dicts", "permuted_copy", "resolve_spec", "spec_from_module",
    "weight_matching",
]
