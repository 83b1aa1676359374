"""Safe output files: never the input, never replaced without --force, written atomically."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import STOP_SIGNALS, BadInputError, OnormError, quoted

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NAME_MAX = 255  # bytes in one file name on every common file system
_RANDOM_PART = 8  # the characters tempfile.mkstemp adds
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV)


@dataclass
class RunState:
    """A CLI run's stop request and what it published, shared by its signal handlers (cli/app.py) and :func:`publish`.

    Publishing is the point of no return. A run asked to stop before it never publishes, even
    where a library caught the KeyboardInterrupt; a stop asked after it is ignored, and the
    run finishes and reports what it did.
    """

    stop: KeyboardInterrupt | None = None  # what the first stop signal raised, before anything was committed
    committed: bool = False  # an output is published, or the outcome is being reported
    published: list[Path] = field(default_factory=list)

    def reset(self) -> None:
        """A new run: no stop asked, nothing published."""
        self.stop, self.committed, self.published = None, False, []

    def begin(self) -> None:
        """A command starts: nothing committed or published yet (a stop already asked still holds)."""
        self.committed, self.published = False, []


RUN = RunState()


def check_output_path(output: Path, inputs: list[Path], force: bool) -> Path:
    """Validate where an output may go; returns it resolved. Raises BadInputError if it may not."""
    output = Path(output)
    shown = quoted(output)
    for path in map(Path, inputs):
        same_file = output.exists() and path.exists() and os.path.samefile(output, path)
        if same_file or output.resolve() == path.resolve():
            raise BadInputError(f"{shown}: the output may not be the input file; choose another path with -o")
    if output.is_symlink():  # writing through it would create or replace a file in another folder
        raise BadInputError(
            f"{shown}: is a symbolic link (to {quoted(os.readlink(output))}); give the real path with -o, or remove the link"
        )
    if output.is_dir():
        raise BadInputError(f"{shown}: is a directory; give a file path with -o")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise BadInputError(f"{shown}: output folder {quoted(folder)} does not exist; create it or choose another -o")
    if not os.access(folder, os.W_OK):
        raise BadInputError(f"{shown}: output folder {quoted(folder)} is not writable; choose another -o")
    if output.exists() and not output.is_file():
        raise BadInputError(
            f"{shown}: is not a regular file (a device, FIFO or socket); onorm replaces only regular files: choose another -o"
        )
    if output.exists() and not force:
        raise BadInputError(f"{shown}: already exists; pass --force to replace it")
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

    def make() -> Path:
        prefix, tail = _temp_affixes(destination.name, suffix)
        fd, tmp = tempfile.mkstemp(suffix=tail, prefix=prefix, dir=destination.parent)
        os.close(fd)
        return Path(tmp)

    with _staged(destination, make, lambda path: path.unlink(missing_ok=True)) as tmp:
        yield tmp


@contextlib.contextmanager
def staged_folder(destination: Path) -> Iterator[Path]:
    """A private temporary folder beside ``destination``, for an output of several files; removed on exit.

    For a model and its external data: both are written inside under their final names, so
    the model's reference to its data holds once both are published (:func:`publish_with_data`).
    """
    destination = Path(destination)

    def make() -> Path:
        prefix, tail = _temp_affixes(destination.name, "")
        return Path(tempfile.mkdtemp(suffix=tail, prefix=prefix, dir=destination.parent))

    with _staged(destination, make, lambda path: shutil.rmtree(path, ignore_errors=True)) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged(destination: Path, make: Callable[[], Path], remove: Callable[[Path], None]) -> Iterator[Path]:
    """What :func:`staged_file` and :func:`staged_folder` share: make, yield, map write failures, always remove."""
    with stop_signals_held():  # a stop between making the temp path and the try below would leave it behind
        try:
            tmp = make()
        except OSError as err:
            raise write_failure(destination, err) from err
    try:
        yield tmp
    except OnormError:
        raise
    except Exception as err:
        failure = write_failure(destination, err, staged=tmp)
        if failure is None:
            raise
        raise failure from err
    finally:
        with stop_signals_held():  # a second stop cannot cut the cleanup short
            remove(tmp)


def data_file(model: Path) -> Path:
    """Where a model file keeps its external data: ``NAME.EXT.data`` beside it."""
    return model.with_name(model.name + ".data")


def publish_with_data(staged: Path, destination: Path, *, replace: bool = True) -> list[Path]:
    """Publish ``staged`` and, if it has one, its external data file: the data first, the model last.

    Until the model appears nothing refers to the new data, so a reader never finds a model
    whose data is missing or old. Returns the paths published.
    """
    published = []
    if data_file(staged).exists():
        publish(data_file(staged), data_file(destination), replace=replace)
        published.append(data_file(destination))
    publish(staged, destination, replace=replace)
    return [*published, destination]


def _temp_affixes(name: str, suffix: str) -> tuple[str, str]:
    """``(prefix, suffix)`` of the hidden temp name ``.NAME.XXXXXXXX[SUFFIX].tmp``, NAME shortened to keep it a legal name."""
    tail = suffix + ".tmp" if len(os.fsencode(suffix)) <= 16 else ".tmp"
    room = _NAME_MAX - _RANDOM_PART - len(os.fsencode(tail)) - 2  # the two dots around NAME
    return f".{os.fsdecode(os.fsencode(name)[:room])}.", tail


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
    return BadInputError(f"{quoted(destination)}: cannot write the output ({reason}); {fix}. Nothing was written")


def publish(staged: Path, destination: Path, *, replace: bool = True) -> None:
    """fsync ``staged`` and atomically move it to ``destination`` (same folder).

    ``replace=False`` (no --force) publishes with an exclusive step: if ``destination``
    appeared meanwhile (another run wrote it), it is left alone and BadInputError says so.
    The published file gets the permissions of a newly created file (``0o666`` less the
    umask), not the owner-only ``0o600`` of the temp file. A run asked to stop (see
    :class:`RunState`) raises its interruption here instead of publishing.
    """
    # Through a descriptor of the file onorm wrote: a link swapped in for the temp name is neither followed nor published.
    fd = os.open(staged, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        written = os.fstat(fd)
        os.fchmod(fd, 0o666 & ~_umask())
        os.fsync(fd)
    finally:
        os.close(fd)
    with stop_signals_held():  # the check, the move and the record happen together or not at all
        if RUN.stop is not None:
            raise RUN.stop
        now = os.lstat(staged)
        if (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino) or not stat.S_ISREG(now.st_mode):
            raise BadInputError(
                f"{quoted(staged)}: the temp file was replaced while onorm wrote it; nothing was published"
            )
        if replace:
            os.replace(staged, destination)
        else:
            _move_exclusively(staged, destination)
        RUN.committed = True
        RUN.published.append(destination)
    with contextlib.suppress(OSError):  # persist the rename itself; not supported everywhere
        dir_fd = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _move_exclusively(staged: Path, destination: Path) -> None:
    """Move ``staged`` to ``destination`` only if nothing is there: link(2) fails rather than replace."""
    try:
        os.link(staged, destination, follow_symlinks=False)
    except FileExistsError as err:
        raise BadInputError(
            f"{quoted(destination)}: appeared while onorm was writing it (another run?) and was left as it is; "
            "pass --force to replace it. Nothing was written"
        ) from err
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        # A file system without hard links: the check and the rename are two steps here.
        if os.path.lexists(destination):
            raise BadInputError(
                f"{quoted(destination)}: already exists; pass --force to replace it. Nothing was written"
            ) from err
        os.replace(staged, destination)
        return
    os.unlink(staged)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Stop signals wait (blocked) while the body runs, then are delivered."""
    # The mask is read before it changes, and blocked inside the try: a stop that arrived just before the block
    # may still raise right after it (Python runs handlers between statements), and must not leave them blocked.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def write_atomically(destination: Path, write: Callable[[Path], None], *, replace: bool = True) -> None:
    """Run ``write(tmp_path)``, then publish the result at ``destination`` atomically (see :func:`publish`)."""
    with staged_file(destination) as tmp:
        write(tmp)
        publish(tmp, destination, replace=replace)


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
