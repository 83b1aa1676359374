"""Safe output files: never the input, never replaced without --force, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BadInputError


def check_output_path(output: Path, inputs: list[Path], force: bool) -> Path:
    """Validate where an output may go; returns it resolved. Raises BadInputError if it may not."""
    output = Path(output)
    for path in map(Path, inputs):
        same_file = output.exists() and path.exists() and os.path.samefile(output, path)
        if same_file or output.resolve() == path.resolve():
            raise BadInputError(f"{output}: the output may not be the input file; choose another path with -o")
    if output.is_dir():
        raise BadInputError(f"{output}: is a directory; give a file path with -o")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise BadInputError(f"{output}: output folder {folder} does not exist; create it or choose another -o")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{output}: output folder {folder} is not writable; choose another -o")
    if output.exists() and not force:
        raise BadInputError(f"{output}: already exists; pass --force to replace it")
    return output.resolve()


@contextlib.contextmanager
def staged_file(destination: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``destination``; removed on exit unless published.

    Write to the yielded path, then call :func:`publish`. If the body raises (or the
    process is interrupted), the temp file is removed and the destination is untouched.
    """
    destination = Path(destination)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=suffix + ".tmp", dir=destination.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


def publish(staged: Path, destination: Path) -> None:
    """fsync ``staged`` and atomically rename it onto ``destination`` (same folder)."""
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, destination)
    with contextlib.suppress(OSError):  # persist the rename itself; not supported everywhere
        dir_fd = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomically(destination: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)``, then publish the result at ``destination`` atomically."""
    with staged_file(destination) as tmp:
        write(tmp)
        publish(tmp, destination)
