"""The typer app and the one place that turns outcomes into exit codes, lines and JSON."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TextIO

import typer

from ..errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    STOP_SIGNALS,
    BadInputError,
    OnormError,
    OptionError,
    Terminated,
    first_line,
    quoted,
)
from ..files import RUN, stop_signals_held

app = typer.Typer(
    name="onorm",
    help="Convert BatchNorm models to Online Normalization, and fold them back for deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Console:
    """Human output: progress and tables on stderr/stdout, silenced under --json."""

    def __init__(self, json_mode: bool, stdout: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.stdout = stdout  # onorm's own stdout (None: sys.stdout); the model's code prints to stderr meanwhile
        self.warnings: list[str] = []  # every warning shown, for the JSON report

    def print(self, text: str = "") -> None:
        """A result line (stdout); suppressed under --json, where the report says it all."""
        if not self.json_mode:
            try:
                typer.echo(text, file=self.stdout)
            except OSError as err:
                raise stdout_failure(err, self.stdout or sys.stdout) from err

    def progress(self, text: str) -> None:
        """A progress line (stderr), so stdout stays clean for pipes."""
        if not self.json_mode:
            typer.echo(text, err=True)

    def warn(self, text: str) -> None:
        """A warning or notice (stderr), shown in every mode, and kept for the report."""
        self.warnings.append(text)
        typer.echo(f"onorm: warning: {text}", err=True)


@contextlib.contextmanager
def warnings_shown_on(console: Console, *categories: type[Warning]) -> Iterator[None]:
    """Show the library's warnings of ``categories`` raised inside as console warnings; others as Python shows them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if issubclass(warning.category, categories):
            console.warn(str(warning.message))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart, with the header first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]


def run_command(
    command: str, json_mode: bool, debug: bool, body: Callable[[Console], tuple[int, dict[str, Any]]]
) -> None:
    """Run ``body(console) -> (exit_code, report)`` and exit with the pipeline contract.

    A failure prints one line on stderr (after the traceback, with --debug only), and a
    JSON object on stdout under --json; :func:`failure` gives its message and exit code.
    """
    RUN.begin()
    start = time.perf_counter()
    try:
        with _user_output_to_stderr() as stdout:
            console = Console(json_mode, stdout)
            code, report = body(console)
        if RUN.stop is not None:  # a library caught the KeyboardInterrupt: the run still stops (it published nothing)
            raise RUN.stop
        seconds = {**report.get("seconds", {}), "total": time.perf_counter() - start}  # export adds its steps
        report = {
            **report,
            "warnings": console.warnings,
            "seconds": {step: round(value, 3) for step, value in seconds.items()},
        }
        text = (
            to_json({"command": command, "ok": code == EXIT_OK, "exit_code": code, **report}, indent=2)
            if json_mode
            else None
        )
    except (KeyboardInterrupt, SystemExit, Exception) as err:  # noqa: BLE001 - the last line of defence: no traceback unless --debug
        # A stop signal explains whatever failed after it (an import it cut short says "cannot import").
        _fail(command, json_mode, debug, *failure(err if RUN.stop is None else RUN.stop))
    RUN.committed = True  # the outcome is decided: from here on a signal cannot change the exit code
    if text is not None:
        try:
            _write_stdout(text)
        except OnormError as err:
            report_error(command, str(err), type(err).__name__)
            raise typer.Exit(err.exit_code) from err
    raise typer.Exit(code)


class StdoutError(OnormError):
    """Stdout does not take onorm's output (a closed pipe, a full disk): exit 2, saying what was published."""


def stdout_failure(err: OSError, stream: TextIO) -> StdoutError:
    """The error for a write to stdout (``stream``) that failed; ``stream`` then leads nowhere, so leaving Python cannot fail on it again."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no descriptor: a test's captured stream
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    published = ", ".join(f"{quoted(path)} was published" for path in RUN.published) or "nothing was written"
    return StdoutError(f"cannot write to stdout ({err.strerror or err}); the report is lost, {published}")


def _write_stdout(text: str) -> None:
    """``text`` on stdout, flushed; StdoutError if stdout does not take it."""
    try:
        typer.echo(text)
        sys.stdout.flush()
    except OSError as err:
        raise stdout_failure(err, sys.stdout) from err


@contextlib.contextmanager
def _user_output_to_stderr() -> Iterator[TextIO]:
    """While a command runs, what the model's code prints goes to stderr, so stdout holds onorm's output alone.

    ``sys.stdout`` is pointed at stderr and, where stdout is a real file, so is file
    descriptor 1, which C extensions and child processes write to directly. Yields the
    stream for onorm's own output: the original stdout.
    """
    stdout = sys.stdout
    try:
        out_fd, err_fd = stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptors (a test's captured streams): Python-level only
        with contextlib.redirect_stdout(sys.stderr):
            yield stdout
        return
    stdout.flush()
    saved = os.dup(out_fd)
    own = open(saved, "w", encoding=stdout.encoding, errors=stdout.errors, closefd=False)  # noqa: SIM115 - closed below
    os.dup2(err_fd, out_fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield own
    finally:
        with stop_signals_held():  # a stop here would leave descriptor 1 on stderr, and the report with it
            with contextlib.suppress(OSError):  # a failed write was reported where it happened
                own.close()
            os.dup2(saved, out_fd)
            os.close(saved)


def failure(err: BaseException) -> tuple[str, int, str]:
    """The ``(message, exit code, kind)`` of an exception that ended a command.

    Ctrl-C exits 130 and SIGTERM (or another terminating signal) 143, even when a library
    wrapped the KeyboardInterrupt (pybind11 turns one during an import into
    ``ImportError("initialization failed")``); ``sys.exit()`` in the model's code 2; an
    :class:`OnormError` its own code; an :class:`OSError` (a file the system would not
    read or write) 2; anything else is a bug in onorm: 3.
    """
    kind = type(err).__name__
    interruption = _interruption(err)
    if isinstance(interruption, Terminated):
        return f"terminated ({interruption.signal_name}); no partial output was left", EXIT_TERMINATED, "Terminated"
    if interruption is not None:
        return "interrupted; nothing was written", EXIT_INTERRUPTED, "KeyboardInterrupt"
    if isinstance(err, SystemExit):
        return (
            (
                f"the model's code called sys.exit({err.code!r}) while onorm built or ran the model; "
                "a model may not end the program: remove that call"
            ),
            EXIT_BAD_INPUT,
            kind,
        )
    if isinstance(err, OptionError):  # reported as the bad input it is, named by its flag
        return err.as_flag(), err.exit_code, BadInputError.__name__
    if isinstance(err, OnormError):
        return str(err), err.exit_code, kind
    if isinstance(err, OSError):
        where = f"{quoted(err.filename)}: " if err.filename else ""
        return f"{where}{err.strerror or err}; check the path, its permissions and the free space", EXIT_BAD_INPUT, kind
    return (
        f"internal error: {kind}: {err} (this is a bug in onorm; rerun with --debug and report it)",
        EXIT_INTERNAL,
        kind,
    )


def _interruption(err: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C or :class:`Terminated`) that ``err`` is or was raised from, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _stop_signals_unwind(exiting: bool) -> Iterator[None]:
    """While the CLI runs, Ctrl-C raises KeyboardInterrupt and SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 raise :class:`Terminated`.

    Only the first signal: later ones are ignored, so they cannot cut the cleanup short, and
    so is every signal once the outcome is committed (an output published, or the report
    being written): the exit status then agrees with the report. A signal the caller
    ignores (nohup's SIGHUP) stays ignored. Afterwards the caller's handlers come back,
    unless the process is ``exiting`` with the outcome: then signals stay ignored.
    """

    def stop(signum: int, frame: Any) -> None:
        if RUN.stop is not None or RUN.committed:
            return
        name = signal.Signals(signum).name
        RUN.stop = KeyboardInterrupt() if signum == signal.SIGINT else Terminated(name)
        raise RUN.stop

    RUN.reset()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    # Only the main thread may set handlers; None is a handler set outside Python, which could not be restored.
    taken = [signum for signum, handler in previous.items() if handler not in (signal.SIG_IGN, None)]
    if threading.current_thread() is not threading.main_thread():
        taken = []
    for signum in taken:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in taken:
            signal.signal(signum, signal.SIG_IGN if exiting else previous[signum])
        RUN.reset()


def report_error(command: str | None, message: str, kind: str) -> dict[str, str]:
    """Print the failure's one line on stderr (``onorm COMMAND: error: ...``); returns the JSON ``error`` object."""
    typer.echo(f"{' '.join(filter(None, ('onorm', command)))}: error: {first_line(message, kind)}", err=True)
    return {"type": kind, "message": message}


def _fail(command: str, json_mode: bool, debug: bool, message: str, code: int, kind: str) -> None:
    if debug:
        traceback.print_exc()
    RUN.committed = True  # the outcome is decided: from here on a signal cannot change the exit code
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
        with contextlib.suppress(StdoutError):  # the line above told the failure; its JSON copy is lost
            _write_stdout(to_json({"command": command, "ok": False, "exit_code": code, "error": error}))


def main(argv: list[str] | None = None, *, early_signals: list[int] | None = None, exiting: bool = False) -> int:
    """Run the CLI; a usage error from the argument parser, and a signal at any point, follow the contract too.

    The parser's own errors (unknown option, missing MODEL, ``--opset abc``) become one
    line on stderr, a JSON object under ``--json``, and exit 2, like every other bad input.
    ``early_signals``: the stop signals that arrived before this was called (see
    :func:`run`); ``exiting``: the process exits with the returned code, see
    :func:`_stop_signals_unwind`.
    """
    argv = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in argv
    with _stop_signals_unwind(exiting):
        command = (
            argv[0] if argv and not argv[0].startswith("-") else None
        )  # refined below, once the commands are known
        stop: KeyboardInterrupt | None = None
        code: int | None = None
        try:  # everything under the handlers inside the try: a stop anywhere here follows the contract
            known = typer.main.get_command(app).commands
            command = command if command in known else None
            if early_signals:
                signal.raise_signal(early_signals[0])
            code = app(args=argv, prog_name="onorm", standalone_mode=False) or 0
        except KeyboardInterrupt as err:  # outside a command's body (parsing, callbacks, leaving): still the contract
            stop = err
        except Exception as err:
            if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):  # not a parser (click) error
                raise
            message = f"{err.format_message().rstrip('.')}; see {' '.join(filter(None, ('onorm', command)))} --help"
            RUN.committed = True
            _print_failure(command, json_mode, message, err.exit_code, type(err).__name__)
            return err.exit_code
        stop = RUN.stop or stop  # typer turns an interrupt outside the body into a silent 130
        if stop is not None and (code is None or not RUN.committed):
            message, code, kind = failure(stop)
            RUN.committed = True
            _print_failure(command, json_mode, message, code, kind)
        return code


def run(early_signals: list[int] | None = None) -> NoReturn:
    """The ``onorm`` process: :func:`main` on ``sys.argv``, then exit with its code, whatever signal comes after.

    ``early_signals`` is where the process recorded the stop signals that arrived while it
    was importing onorm (see ``onorm_launch.py``).
    """
    sys.exit(main(early_signals=early_signals, exiting=True))


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"onorm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Convert BatchNorm models to Online Normalization, and fold them back for deployment."""
