"""Safe output files: never the input, never replaced without --force, written atomically."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BadInputError, OnormError

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
    A failure of the file system (full disk, read-only folder, I/O error) becomes a
    :class:`BadInputError` naming ``destination``; see :func:`write_failure`.
    """
    destination = Path(destination)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=suffix + ".tmp", dir=destination.parent)
    except OSError as err:
        raise write_failure(destination, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except OnormError:
        raise
    except Exception as err:
        failure = write_failure(destination, err, staged=tmp_path)
        if failure is None:
            raise
        raise failure from err
    finally:
        tmp_path.unlink(missing_ok=True)


def write_failure(destination: Path, err: Exception, staged: Path | None = None) -> BadInputError | None:
    """The one-line error for ``err`` raised while writing ``destination``; None if the file system is not to blame.

    An :class:`OSError` is the file system's answer. Other exceptions are blamed on it only
    when the folder is now full: torch's C++ writer reports a full disk as
    ``RuntimeError("... unexpected pos ...")``. ``staged`` (the partial temp file) must
    still exist for that check, so call this before removing it.
    """
    if isinstance(err, OSError):
        code, reason = err.errno, err.strerror or str(err)
    elif staged is not None and os.statvfs(staged.parent).f_bavail == 0:
        code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
    else:
        return None
    fix = "free some space or choose another -o" if code in _OUT_OF_SPACE else "choose another -o"
    return BadInputError(f"{destination}: cannot write the output ({reason}); {fix}. Nothing was written")


def publish(staged: Path, destination: Path) -> None:
    """fsync ``staged`` and atomically rename it onto ``destination`` (same folder).

    The published file gets the permissions of a newly created file (``0o666`` less the
    umask), not the owner-only ``0o600`` of the temp file.
    """
    os.chmod(staged, 0o666 & ~_umask())
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


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
