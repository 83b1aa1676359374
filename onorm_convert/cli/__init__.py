"""The ``onorm`` command line: a thin layer over the load/convert/fold/export/verify modules."""

from . import (  # noqa: F401 - registers `onorm convert` and `onorm inspect`
    convert_cmd,
    export_cmd,  # noqa: F401 - registers `onorm export`
    inspect_cmd,
    revert_cmd,  # noqa: F401 - registers `onorm revert`
)
from .app import app, main

__all__ = ["app", "main"]
