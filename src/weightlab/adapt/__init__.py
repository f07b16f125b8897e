"""Adapt family: trainable structure on weights. Methods register themselves on import (one file per method).

``attach(model, method, targets=..., **config)`` wraps target layers in one generic
:class:`~weightlab.adapt.layer.AdapterLayer`; ``fold``/``unfold``/``detach`` (``fold`` puts the adapter into the weights); ``regularizers``
and ``backward_regularizers`` (SORSA's term after clipping); ``save``/``load`` weightlab adapter
folders; several named adapters on one model (``attach(..., name=)``, ``set_active``, ``delete``,
``adapter_names``, ``add_weighted``: PEFT's add_weighted_adapter); ``export_peft``/``import_peft`` for PEFT folders (LoRA, DoRA, AdaLoRA, IA3, VeRA, LoHa, LoKr, OFT, BOFT); ``extract_lora`` (a PEFT LoRA from a
fine-tune and its base, as mergekit-extract-lora); ``make_optimizer``.
"""
from . import adalora, bat, boft, bone, dora, gradnormlorp, ia3, loha, lokr, lora, oft, pissa, sorsa, vera  # noqa: F401,E501  (register the methods)
from . import dsee, pst, sara, sltrain  # noqa: F401  (sparse methods)
from . import compander, contracon, mixturegrowth, orthogonal  # noqa: F401  (compositional methods)
from .api import (active_adapters, adapter_layers, adapter_names, attach, backward_regularizers, count_trainable,
                  delete, detach, fold, load, make_optimizer, merge, regularizer_values, regularizers, save,
                  select_targets, set_active, step_hooks, trainable_parameters, unfold, unmerge)
from .combine import add_weighted, combine_folders
from .extract import extract_lora
from .layer import AdapterLayer, AdapterMethod
from .peft_io import export_folder_peft, export_peft, import_peft, import_peft_all

__all__ = ["AdapterLayer", "AdapterMethod", "active_adapters", "adapter_layers", "adapter_names", "add_weighted",
           "attach", "backward_regularizers", "combine_folders", "count_trainable", "delete",
           "detach", "export_folder_peft", "export_peft", "extract_lora", "fold", "import_peft", "import_peft_all",
           "load", "set_active",
           "make_optimizer", "merge", "regularizer_values", "regularizers", "save", "select_targets", "step_hooks",
           "trainable_parameters", "unfold", "unmerge"]
