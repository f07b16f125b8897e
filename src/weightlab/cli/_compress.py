"""The options prune, quantize and compensate share (the work itself is in weightlab.compress.jobs)."""
from __future__ import annotations

import typer

from ._common import device_option, dtype_option

SEQUENTIAL_HELP = ("onload one block at a time from the checkpoint (memory independent of depth); default for causal "
                   "LMs when the method allows it; --whole-model loads everything (RD allocation, GBLM, D-Pruner)")


def placement_options():
    """Typer options, in order: device, dtype, sequential, offload_activations, max_memory."""
    return (device_option(), dtype_option(),
            typer.Option(None, "--sequential/--whole-model", help=SEQUENTIAL_HELP),
            typer.Option(False, "--offload-activations",
                         help="keep the calibration activations on the CPU when they do not fit the device"),
            typer.Option(None, "--max-memory",
                         help="memory budget checked before any work: 8GB (host) or cpu=8GB,cuda:0=20GB"))


def parse_params(items, flag: str = "--param") -> dict:
    """-p KEY=VALUE options (values read as YAML: numbers, booleans, lists)."""
    import yaml

    from ..errors import ConfigError

    out = {}
    for kv in items or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {kv!r}")
        out[k] = yaml.safe_load(v)
    return out
