"""The ``weightlab`` command. Thin: parse, call the library, print."""
from __future__ import annotations

import sys

import click
import typer

from .._version import __version__
from ..errors import WeightlabError
from ._common import err_console

app = typer.Typer(name="weightlab", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Inspect, adapt, merge and compress neural-network weights; score the data behind them.")


def _version(value: bool) -> None:
    if value:
        print(f"weightlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars and no messages; errors and "
                                                                  "--json output still print")) -> None:
    if quiet:
        import os

        from ._common import console

        os.environ["WEIGHTLAB_PROGRESS"] = "0"
        console.quiet = True


from . import adapt, align, data, demo, export, info, inspect, merge, methods, prune, quantize, run, signature, zoo  # noqa: E402,F401,E501  (commands register on the app)
from . import internals  # noqa: E402,F401  (neurons, heads)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line (no traceback) and exit 1."""
    from ._common import bare_json_means_stdout

    try:
        rv = app(args=bare_json_means_stdout(sys.argv[1:] if argv is None else list(argv)), standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except WeightlabError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
        code = 1
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        code = 130
    except KeyboardInterrupt:
        err_console.print("interrupted; no output was written under the final name")
        code = 130
    except OSError as e:  # disk full, permissions: environment, not a bug
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        code = 1
    if argv is None:
        sys.exit(code)
    return code
