"""Expected failures, each carrying the exit code the CLI reports.

Exit codes (the pipeline contract, documented in docs/contract.md): 0 done (and verified,
where the command verifies), 1 verification failed, 2 bad input or usage (including an
output that cannot be written), 3 an internal error (a bug in onorm), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM killed


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pipeline's timeout, a container stopping), raised where the program is.

    A KeyboardInterrupt, so it unwinds exactly as Ctrl-C does: temp files are removed and
    nothing is published.
    """


class OnormError(Exception):
    """An expected failure: one line saying what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(OnormError):
    """The input file, a flag, or the model it describes cannot be used (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class VerificationError(OnormError):
    """A numerical check failed: outputs differ beyond tolerance or are not finite (exit 1)."""

    exit_code = EXIT_MISMATCH


def first_line(err: BaseException | str, fallback: str = "") -> str:
    """The first line of a message or exception (else ``fallback``, or the exception's type name)."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return fallback or (type(err).__name__ if isinstance(err, BaseException) else "")
