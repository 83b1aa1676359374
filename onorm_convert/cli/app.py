"""The typer app and the one place that turns outcomes into exit codes, lines and JSON."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import typer

from ..errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    OnormError,
    OptionError,
    Terminated,
    first_line,
)

app = typer.Typer(
    name="onorm",
    help="Convert BatchNorm models to Online Normalization, and fold them back for deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart, with the header first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]


def run_command(command: str, json_mode: bool, debug: bool, body: Callable[[Console], tuple[int, dict[str, Any]]]) -> None:
    """Run ``body(console) -> (exit_code, report)`` and exit with the pipeline contract.

    A failure prints one line on stderr (after the traceback, with --debug only), and a
    JSON object on stdout under --json; :func:`failure` gives its message and exit code.
    """
    console = Console(json_mode)
    try:
        code, report = body(console)
    except (KeyboardInterrupt, Exception) as err:  # noqa: BLE001 - the last line of defence: no traceback unless --debug
        _fail(command, json_mode, debug, *failure(err))
    if json_mode:
        typer.echo(to_json({"command": command, "ok": code == EXIT_OK, "exit_code": code, **report}, indent=2))
    raise typer.Exit(code)


def failure(err: BaseException) -> tuple[str, int, str]:
    """The ``(message, exit code, kind)`` of an exception that ended a command.

    Ctrl-C exits 130 and SIGTERM 143, even when a library wrapped the KeyboardInterrupt
    (pybind11 turns one during an import into ``ImportError("initialization failed")``); an
    :class:`OnormError` its own code; an :class:`OSError` (a file the system would not
    read or write) 2; anything else is a bug in onorm: 3.
    """
    kind = type(err).__name__
    interruption = _interruption(err)
    if isinstance(interruption, Terminated):
        return TERMINATED, EXIT_TERMINATED, "Terminated"
    if interruption is not None:
        return "interrupted; nothing was written", EXIT_INTERRUPTED, "KeyboardInterrupt"
    if isinstance(err, OptionError):
        return err.as_flag(), err.exit_code, kind
    if isinstance(err, OnormError):
        return str(err), err.exit_code, kind
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}; check the path, its permissions and the free space", EXIT_BAD_INPUT, kind
    return f"internal error: {kind}: {err} (this is a bug in onorm; rerun with --debug and report it)", EXIT_INTERNAL, kind


def _interruption(err: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C or :class:`Terminated`) that ``err`` is or was raised from, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# A SIGTERM can come after a verified file was published: "partial" is true either way.
TERMINATED = "terminated (SIGTERM); no partial output was left"


@contextlib.contextmanager
def _sigterm_unwinds():
    """While the CLI runs, SIGTERM raises :class:`Terminated` instead of killing the process outright.

    Only the first: later ones are ignored, so they cannot cut the cleanup short. Yields a
    list that is non-empty once a SIGTERM arrived.
    """
    received: list[int] = []

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signum)
        raise Terminated()

    previous = signal.getsignal(signal.SIGTERM)
    # Only the main thread may set handlers; None is a handler set outside Python, which could not be restored.
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield received
        return
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def report_error(command: str | None, message: str, kind: str) -> dict[str, str]:
    """Print the failure's one line on stderr (``onorm COMMAND: error: ...``); returns the JSON ``error`` object."""
    typer.echo(f"{' '.join(filter(None, ('onorm', command)))}: error: {first_line(message, kind)}", err=True)
    return {"type": kind, "message": message}


def _fail(command: str, json_mode: bool, debug: bool, message: str, code: int, kind: str) -> None:
    if debug:
        traceback.print_exc()
    _print_failure(command, json_mode, message, code, kind)
    raise typer.Exit(code)


def to_json(report: dict[str, Any], indent: int | None = None) -> str:
    """Strict JSON: a non-finite figure (a NaN error) becomes ``null``, which every parser reads."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(item) for item in value]
        return value

    return json.dumps(strict(report), indent=indent, default=str, allow_nan=False)


def _print_failure(command: str | None, json_mode: bool, message: str, code: int, kind: str) -> None:
    """The failure's stderr line, and under --json its JSON object on stdout."""
    error = report_error(command, message, kind)
    if json_mode:
        typer.echo(to_json({"command": command, "ok": False, "exit_code": code, "error": error}))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a usage error from the argument parser follows the contract too.

    The parser's own errors (unknown option, missing MODEL, ``--opset abc``) become one
    line on stderr, a JSON object under ``--json``, and exit 2, like every other bad input.
    """
    argv = sys.argv[1:] if argv is None else argv
    known = typer.main.get_command(app).commands
    command = argv[0] if argv and argv[0] in known else None
    terminated: list[int] = []
    try:
        with _sigterm_unwinds() as terminated:
            code = app(args=argv, prog_name="onorm", standalone_mode=False) or 0
    except Terminated:  # outside a command's body (parsing, callbacks, leaving): still the contract
        code = None
    except Exception as err:
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):  # not a parser (click) error
            raise
        message = f"{err.format_message().rstrip('.')}; see {' '.join(filter(None, ('onorm', command)))} --help"
        _print_failure(command, "--json" in argv, message, err.exit_code, type(err).__name__)
        return err.exit_code
    if terminated and code != EXIT_TERMINATED:  # click turns an interrupt outside the body into a silent 130
        _print_failure(command, "--json" in argv, TERMINATED, EXIT_TERMINATED, "Terminated")
        return EXIT_TERMINATED
    return code


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
