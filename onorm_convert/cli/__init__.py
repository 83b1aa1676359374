"""The ``onorm`` command line: a thin layer over the load/convert/fold/export/verify modules."""

from . import convert_cmd, inspect_cmd  # noqa: F401 - registers `onorm convert` and `onorm inspect`
from . import export_cmd  # noqa: F401 - registers `onorm export`
from .app import app, main

__all__ = ["app", "main"]
