"""The self-describing checkpoint written by ``onorm convert`` for a state dict + ``--arch`` input.

A plain dict of tensors and JSON-like values, so ``torch.load(weights_only=True)`` reads it
and nothing in it runs code::

    {"format": FORMAT_TAG, "format_version": 1, "tool_version": "0.1.0",
     "arch": "package.module:factory", "arch_kwargs": {...},
     "conversion": {"ecm": ..., "clamp_value": ..., ...},   # the options given to convert()
     "input_shapes": [[1, 3, 8, 8], ...],                   # example inputs; [] if none
     "state_dict": {...}}

Rebuilding it (see :func:`onorm_convert.load.read_model`): ``arch(**arch_kwargs)``, converted
with ``conversion``, then ``state_dict`` loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BadInputError
from .files import write_atomically

FORMAT_TAG = "onorm_convert.checkpoint"
FORMAT_VERSION = 1


# The keyword arguments of onorm_convert.convert that a checkpoint records.
CONVERSION_OPTIONS = frozenset({"ecm", "clamp_value", "alpha_fwd", "alpha_bkw", "include", "exclude", "frozen_bn"})


def make_checkpoint(
    module: nn.Module,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    conversion: Mapping[str, Any],
    input_shapes: Sequence[Sequence[int]] = (),
) -> dict[str, Any]:
    """The checkpoint dict for a converted ``module`` built by ``arch(**arch_kwargs)``."""
    from . import __version__

    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
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
    for field, kind in expected.items():
        malformed = (
            not isinstance(obj.get(field), kind)
            or (field == "conversion" and not set(obj[field]) <= CONVERSION_OPTIONS)
            or (field == "input_shapes" and not shapes_ok)
        )
        if malformed:
            raise BadInputError(
                f"{source}: onorm checkpoint field {field!r} is missing or malformed; the file is damaged, convert the model again"
            )
    return dict(obj)
