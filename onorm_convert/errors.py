"""Expected failures, each carrying the exit code the CLI reports.

Exit codes (the pipeline contract, documented in docs/contract.md): 0 done (and verified,
where the command verifies), 1 verification failed, 2 bad input or usage (including an
output that cannot be written), 3 an internal error (a bug in onorm), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM killed


# The signals that ask a process to end, each unwound like SIGTERM (exit 143); SIGINT is Ctrl-C (exit 130).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGINT, *TERMINATING_SIGNALS)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pipeline's timeout, a container stopping) or another terminating signal, raised where the program is.

    A KeyboardInterrupt, so it unwinds exactly as Ctrl-C does: temp files are removed and
    nothing is published. Its argument is the signal's name.
    """

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class OnormError(Exception):
    """An expected failure: one line saying what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(OnormError):
    """The input file, a flag, or the model it describes cannot be used (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class OptionError(BadInputError):
    """An option's value is out of range. Names the option as the library knows it; the CLI names its flag."""

    def __init__(self, option: str, value: object, requirement: str) -> None:
        self.option, self.value, self.requirement = option, value, requirement
        super().__init__(f"{option}={value!r}: {requirement}")

    def as_flag(self) -> str:
        """The message as a command line user reads it: ``--clamp-value -1.0: must be positive``."""
        value = repr(self.value) if isinstance(self.value, str) else self.value
        return f"--{self.option.replace('_', '-')} {value}: {self.requirement}"


class VerificationError(OnormError):
    """A numerical check failed: outputs differ beyond tolerance or are not finite (exit 1)."""

    exit_code = EXIT_MISMATCH


def first_line(err: BaseException | str, fallback: str = "") -> str:
    """The first line of a message or exception (else ``fallback``, or the exception's type name)."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return fallback or (type(err).__name__ if isinstance(err, BaseException) else "")


def quoted(path: object) -> str:
    """A file name for a one-line message: as it is, or quoted (repr) where it holds control characters."""
    text = str(path)
    return repr(text) if any(ord(ch) < 32 or ord(ch) == 127 for ch in text) else text
