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


def json_option(what: str = "the result"):
    """The shared ``--json FILE|-`` option: one meaning everywhere (``-``, or a bare ``--json``, is stdout)."""
    import typer

    return typer.Option(None, "--json", metavar="FILE|-",
                        help=f"write {what} as JSON to FILE, or to stdout with - (a bare --json means -)")


def emit_json(obj, dest: str | None) -> bool:
    """Write ``obj`` as JSON to ``dest`` (a file, atomically, or '-' for stdout). True when it went to stdout:
    the command then prints nothing else there, so the output pipes into jq."""
    if not dest:
        return False
    text = json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        return True
    from ..io.atomic import write_file_atomic

    write_file_atomic(dest, text)
    err_console.print(f"wrote {dest}", highlight=False, markup=False)
    return False


def bare_json_means_stdout(argv: list[str]) -> list[str]:
    """``--json`` with no value (last, or followed by another option) is ``--json -``."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--json" and (nxt is None or (nxt.startswith("-") and nxt != "-")):
            out.append("-")
    return out


def force_option():
    import typer

    return typer.Option(False, "--force", help="replace existing output files")


def check_outputs(paths, inputs, force: bool) -> None:
    """Single-file outputs follow the folders' rule, checked before any work: never an input (or inside
    one), and an existing file only with --force. ``inputs``: paths or model references (zoo:...)."""
    from pathlib import Path

    from ..errors import OutputExistsError
    from ..io.atomic import check_not_input
    from ..io.refs import resolve_model

    resolved = []
    for i in inputs:
        if i:
            try:
                resolved.append(resolve_model(str(i)))
            except Exception:  # an unresolvable reference fails later with its own error
                resolved.append(Path(str(i)))
    for p in paths:
        if not p or p == "-":
            continue
        check_not_input(Path(p), resolved)
        if Path(p).exists() and not force:
            raise OutputExistsError(f"'{p}' already exists; pass --force to replace it")
