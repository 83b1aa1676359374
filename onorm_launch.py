"""The ``onorm`` command: takes the stop signals first, then imports onorm (torch takes seconds to import).

A top-level module, outside the ``onorm_convert`` package, whose ``__init__`` imports torch:
a Ctrl-C or SIGTERM that arrives while onorm is still being imported is only recorded here,
and once the CLI is loaded it stops the run like one that arrives later (exit 130 or 143,
with the one line). ``python -m onorm_convert`` imports the package first, so there a signal
during that import still ends the process the default way.
"""

import signal

# The same signals as onorm_convert.errors.STOP_SIGNALS, which cannot be imported yet.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


def main() -> None:
    """Record stop signals (except those the caller ignores), import the CLI, and run it."""
    received: list[int] = []
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda signum, frame: received.append(signum))
    from onorm_convert.cli.app import run

    run(received)


if __name__ == "__main__":
    main()
