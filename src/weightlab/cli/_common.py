from __future__ import annotations

import json
import sys

from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_json(obj) -> None:
    """Plain JSON on stdout (no colours) so it pipes into jq and files."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def device_option(default: str = "auto"):
    """The shared ``--device`` option (one policy for every computing command)."""
    import typer

    from ..engine.device import DEVICE_HELP

    return typer.Option(default, "--device", help=DEVICE_HELP)


def dtype_option():
    import typer

    from ..engine.device import DTYPE_HELP

    return typer.Option("auto", "--dtype", help=DTYPE_HELP)
