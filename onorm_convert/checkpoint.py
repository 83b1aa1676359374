"""The self-describing checkpoint written by ``onorm convert`` for a state dict + ``--arch`` input.

A plain dict of tensors and JSON-like values, so ``torch.load(weights_only=True)`` reads it
and nothing in it runs code::

    {"format": FORMAT_TAG, "format_version": 1, "tool_version": "0.1.0",
     "arch": "package.module:factory", "arch_kwargs": {...},
     "signature": "hex",                                    # this user's HMAC of arch + arch_kwargs, or None
     "conversion": {"ecm": ..., "clamp_value": ..., ...},   # the options given to convert()
     "input_shapes": [[1, 3, 8, 8], ...],                   # example inputs; [] if none
     "state_dict": {...}}

Rebuilding it (see :func:`onorm_convert.load.read_model`): ``arch(**arch_kwargs)``, converted
with ``conversion``, then ``state_dict`` loaded. Only a checkpoint signed by this user's
onorm is rebuilt from its own ``arch`` without consent (:mod:`onorm_convert.trust`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadInputError
from .files import write_atomically
from .trust import KeyUnavailable, sign

FORMAT_TAG = "onorm_convert.checkpoint"
FORMAT_VERSION = 1
# package.module:factory, within reason: a recorded arch is shown in messages before anything is imported.
_ARCH_SPEC = re.compile(r"[A-Za-z_][\w.]{0,199}:[A-Za-z_][\w.]{0,199}")


# The keyword arguments of onorm_convert.convert that a checkpoint records.
CONVERSION_OPTIONS = frozenset({"ecm", "clamp_value", "alpha_fwd", "alpha_bkw", "include", "exclude", "frozen_bn"})


class UnsignedCheckpointWarning(UserWarning):
    """A checkpoint was written without this user's signature: loading it will need --arch or --trust."""


def make_checkpoint(
    module: nn.Module,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    conversion: Mapping[str, Any],
    input_shapes: Sequence[Sequence[int]] = (),
) -> dict[str, Any]:
    """The checkpoint dict for a converted ``module`` built by ``arch(**arch_kwargs)``, signed by this user.

    Issues :class:`UnsignedCheckpointWarning` and leaves it unsigned where this user's key
    cannot be made (no writable home folder, an unsafe key file).
    """
    from . import __version__

    try:
        signature = sign(arch, arch_kwargs)
    except KeyUnavailable as err:
        warnings.warn(f"the checkpoint is not signed ({err}); loading it will need --arch {arch} or --trust", UnsignedCheckpointWarning, stacklevel=2)
        signature = None
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "signature": signature,
        "conversion": dict(conversion),
        "input_shapes": [list(shape) for shape in input_shapes],
        "state_dict": {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()},
    }


def save_checkpoint(path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temp file beside it, fsync, rename)."""
    write_atomically(Path(path), lambda tmp: torch.save(dict(checkpoint), tmp))


def is_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) claims to be an onorm checkpoint."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT_TAG


def validate_checkpoint(obj: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """Check the fields of a loaded onorm checkpoint; BadInputError naming the first bad one."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadInputError(
            f"{source}: onorm checkpoint format version {version!r} is not supported (this onorm reads up to "
            f"{FORMAT_VERSION}); upgrade onorm"
        )
    expected = {"arch": str, "arch_kwargs": Mapping, "conversion": Mapping, "input_shapes": list, "state_dict": Mapping}
    shapes_ok = all(
        isinstance(shape, (list, tuple)) and all(isinstance(d, int) and d > 0 for d in shape)
        for shape in obj.get("input_shapes") or []
    )
    if not isinstance(obj.get("signature"), (str, type(None))):
        raise BadInputError(f"{source}: onorm checkpoint field 'signature' is malformed; the file is damaged, convert the model again")
    for field, kind in expected.items():
        malformed = (
            not isinstance(obj.get(field), kind)
            or (field == "arch" and not _ARCH_SPEC.fullmatch(obj[field]))
            or (field == "conversion" and not set(obj[field]) <= CONVERSION_OPTIONS)
            or (field == "input_shapes" and not shapes_ok)
        )
        if malformed:
            raise BadInputError(
                f"{source}: onorm checkpoint field {field!r} is missing or malformed; the file is damaged, convert the model again"
            )
    return dict(obj)
