"""The ``onorm`` command line: a thin layer over the load/convert/fold/export/verify modules."""

from .app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
