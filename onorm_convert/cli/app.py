"""The typer app and the one place that turns outcomes into exit codes, lines and JSON."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer

from ..errors import EXIT_INTERRUPTED, EXIT_OK, OnormError

app = typer.Typer(
    name="onorm",
    help="Convert BatchNorm models to Online Normalization, and fold them back for deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INTERNAL = 3


class Console:
    """Human output: progress and tables on stderr/stdout, silenced under --json."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode

    def print(self, text: str = "") -> None:
        """A result line (stdout); suppressed under --json, where the report says it all."""
        if not self.json_mode:
            typer.echo(text)

    def progress(self, text: str) -> None:
        """A progress line (stderr), so stdout stays clean for pipes."""
        if not self.json_mode:
            typer.echo(text, err=True)

    def warn(self, text: str) -> None:
        """A warning or notice (stderr), shown in every mode."""
        typer.echo(f"onorm: warning: {text}", err=True)


def run_command(command: str, json_mode: bool, debug: bool, body: Callable[[Console], tuple[int, dict[str, Any]]]) -> None:
    """Run ``body(console) -> (exit_code, report)`` and exit with the pipeline contract.

    Expected failures (:class:`OnormError`) print one line on stderr (and a JSON object
    on stdout under --json) and exit with their code; Ctrl-C exits 130; an unexpected
    exception is a bug: one line (traceback with --debug), exit 3.
    """
    console = Console(json_mode)
    try:
        code, report = body(console)
    except OnormError as err:
        _fail(command, json_mode, debug, str(err), err.exit_code, type(err).__name__)
    except KeyboardInterrupt:
        _fail(command, json_mode, debug, "interrupted; nothing was written", EXIT_INTERRUPTED, "KeyboardInterrupt")
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback unless --debug
        message = f"internal error: {type(err).__name__}: {err} (this is a bug in onorm; rerun with --debug and report it)"
        _fail(command, json_mode, debug, message, EXIT_INTERNAL, type(err).__name__)
    if json_mode:
        typer.echo(json.dumps({"command": command, "ok": code == EXIT_OK, "exit_code": code, **report}, indent=2, default=str))
    raise typer.Exit(code)


def _fail(command: str, json_mode: bool, debug: bool, message: str, code: int, kind: str) -> None:
    if debug:
        traceback.print_exc()
    first_line = message.strip().splitlines()[0] if message.strip() else kind
    typer.echo(f"onorm {command}: error: {first_line}", err=True)
    if json_mode:
        typer.echo(json.dumps({"command": command, "ok": False, "exit_code": code, "error": {"type": kind, "message": message}}))
    sys.stdout.flush()
    raise typer.Exit(code)


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"onorm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Convert BatchNorm models to Online Normalization, and fold them back for deployment."""
