"""The ``weightlab`` command. Thin: parse, call the library, print."""
from __future__ import annotations

import sys

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


from . import adapt, align, data, demo, elastic, export, info, inspect, merge, methods, prune, quantize, run, signature, zoo  # noqa: E402,F401,E501  (commands register on the app)
from . import internals  # noqa: E402,F401  (neurons, heads)
from . import sparse_train  # noqa: E402,F401  (spdf, scratch)


def _click_exceptions():
    """(exit, no-args-help, usage/click error, abort) classes of every click the CLI may raise: typer bundles
    its own copy (typer._click, with Exit/Abort in typer.exceptions) and raises those; a standalone click's
    are caught too."""
    import typer.exceptions as te

    exits, helps, errors, aborts = [te.Exit], [], [], [te.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            m = __import__(name, fromlist=["ClickException"])
        except ImportError:
            continue
        errors.append(m.ClickException)
        helps += [m.NoArgsIsHelpError] if hasattr(m, "NoArgsIsHelpError") else []
        exits += [m.Exit] if hasattr(m, "Exit") else []
        aborts += [m.Abort] if hasattr(m, "Abort") else []
    return tuple(exits), tuple(helps), tuple(errors), tuple(aborts)


def _terminate_as_interrupt() -> None:
    """SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so temporary output folders are removed."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. an embedding application): leave its handlers alone
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line (no traceback) and exit 1; usage errors print the usage and
    exit 2."""
    from rich.markup import escape

    from ._common import bare_json_means_stdout

    exit_exc, help_exc, click_exc, abort_exc = _click_exceptions()
    _terminate_as_interrupt()
    try:
        rv = app(args=bare_json_means_stdout(sys.argv[1:] if argv is None else list(argv)), prog_name="weightlab",
                 standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except WeightlabError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        code = 1
    except exit_exc as e:
        code = e.exit_code
    except help_exc as e:  # bare `weightlab` or a bare group: the help, as a usage error
        text = e.ctx.get_help()  # typer's rich help prints itself and returns ""
        if text:
            sys.stderr.write(text + "\n")
        code = 2
    except click_exc as e:  # usage errors: missing argument, unknown option or command, a bad value
        e.show()
        code = e.exit_code
    except abort_exc:
        err_console.print("aborted")
        code = 130
    except KeyboardInterrupt:
        err_console.print("interrupted; no output was written under the final name")
        code = 130
    except OSError as e:  # disk full, permissions: environment, not a bug
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        code = 1
    if argv is None:
        sys.exit(code)
    return code
