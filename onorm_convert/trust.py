"""Consent for model code named by a file: checkpoints signed with a user-local key.

An onorm checkpoint names the code that builds its model (``arch`` and ``arch_kwargs``).
Importing that module and calling that factory runs code chosen by whoever wrote the
file, so a checkpoint is rebuilt without flags only when *this user's* onorm wrote it:
``make_checkpoint`` signs the two fields, and where the code's top-level module was found
(:func:`code_location`), with an HMAC-SHA256 under a key that only this user can read.
Loading checks the signature, and that the name still finds the code in the same place
(not a look-alike module in the current folder), before anything is imported. Any other
checkpoint (from a colleague, a download, an older onorm, or crafted) needs the user to
name the code (``--arch``) or to accept the file's choice (``--trust``).

The key is 32 random bytes in ``$ONORM_CONFIG_DIR/checkpoint.key`` (default
``$XDG_CONFIG_HOME/onorm``, else ``~/.config/onorm``), created on first use with mode
0600. A key that is a symbolic link, belongs to another user, or that others may read or
write is not used: nothing is signed with it and nothing it signed is trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

KEY_NAME = "checkpoint.key"
_KEY_BYTES = 32
_DOMAIN = b"onorm checkpoint code v2\0"  # a signature of this kind cannot be replayed as any other
MAX_DEPTH = 32  # of recorded arguments: deeper is no model's configuration, and would overflow the stack


class KeyUnavailable(Exception):
    """The user-local key cannot be read or made; the message says why."""


def key_path() -> Path:
    """Where this user's signing key lives (see the module docstring); a relative XDG_CONFIG_HOME is ignored, as the spec says."""
    configured = os.environ.get("ONORM_CONFIG_DIR")
    if configured:
        return Path(configured).absolute() / KEY_NAME
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "onorm" / KEY_NAME


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """Make the current directory importable, first, as ``python -m`` does; model code is imported inside."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def code_location(arch: str) -> str | None:
    """Where importing ``arch``'s top-level module would take it from now, found without importing anything."""
    top = arch.partition(":")[0].split(".")[0]
    try:
        with cwd_importable():
            spec = importlib.util.find_spec(top)  # a top-level name: no parent package is imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return (
        spec.origin
        if spec.origin not in (None, "namespace")
        else os.pathsep.join(spec.submodule_search_locations or ())
    )


def sign(arch: str, arch_kwargs: Mapping[str, Any], location: str | None) -> str:
    """The hex signature of ``(arch, arch_kwargs, location)`` under this user's key, made on first use.

    Raises :class:`KeyUnavailable` when the key cannot be made or is unsafe, or when the
    fields have no canonical JSON form (such a checkpoint is written unsigned).
    """
    return _mac(_key(create=True), arch, arch_kwargs, location)


def signed_by_this_user(arch: Any, arch_kwargs: Any, location: Any, signature: Any) -> tuple[bool, str]:
    """Whether ``signature`` is this user's over the three fields, with the code still found at ``location``; else why not."""
    if not isinstance(signature, str) or not signature:
        return False, "it carries no signature"
    try:
        expected = _mac(_key(create=False), arch, arch_kwargs, location)
    except KeyUnavailable as err:
        return False, str(err)
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace")):
        return False, f"its signature does not match your key {key_path()}"
    now = code_location(arch)
    if now != location:
        return False, f"its code would now be imported from {now!r}, not from {location!r} where you converted it"
    return True, ""


def _mac(key: bytes, arch: Any, arch_kwargs: Any, location: Any) -> str:
    fields = {"arch": arch, "arch_kwargs": arch_kwargs, "location": location}
    if not _canonical(fields):
        raise KeyUnavailable(
            "its arch_kwargs have no canonical JSON form (tuples, keys that are not strings, or too deep)"
        )
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hmac.new(key, _DOMAIN + text.encode("ascii"), hashlib.sha256).hexdigest()


def _canonical(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` has exactly one JSON text: only str keys, lists not tuples, finite numbers, shallow."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(isinstance(key, str) and _canonical(item, depth + 1) for key, item in value.items())
    if isinstance(value, list):
        return all(_canonical(item, depth + 1) for item in value)
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return value is None or isinstance(value, (str, int, bool))


def _key(*, create: bool) -> bytes:
    try:
        path = key_path()
    except RuntimeError as err:  # Path.home() with no home folder
        raise KeyUnavailable(f"there is no home folder for a signing key ({err}); set ONORM_CONFIG_DIR") from err
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            raise KeyUnavailable(f"you have no signing key yet ({path})") from None
    try:
        _make_key(path)
    except FileExistsError:  # another onorm made it first: use theirs
        pass
    except OSError as err:
        raise KeyUnavailable(f"cannot create the signing key {path} ({err.strerror or err})") from err
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    """The key's bytes, refusing a link, another user's file, or one that others may read or write."""
    try:
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        )  # a FIFO would block
    except FileNotFoundError:
        raise
    except OSError as err:
        raise KeyUnavailable(
            f"the signing key {path} cannot be read ({err.strerror or err}); it may be a symbolic link"
        ) from err
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise KeyUnavailable(
                f"the signing key {path} is not a private file of yours (mode 0600); remove it to make a new one"
            )
        key = handle.read()
    if len(key) != _KEY_BYTES:
        raise KeyUnavailable(f"the signing key {path} is damaged; remove it to make a new one")
    return key


def _make_key(path: Path) -> None:
    """Write a fresh key with O_EXCL (never over another file), complete before it appears."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(_KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        os.link(partial, path)  # fails with FileExistsError if another process won the race
    finally:
        partial.unlink(missing_ok=True)
