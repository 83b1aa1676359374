"""Example inputs: parsing ``--input-shape``, seeded random batches, and running a model on them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BadInputError

_SHAPE = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` into a shape; every dimension a positive integer."""
    if not _SHAPE.match(text):
        raise BadInputError(f"--input-shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224")
    shape = tuple(int(part) for part in text.split(","))
    if any(dim == 0 for dim in shape):
        raise BadInputError(f"--input-shape {text!r}: dimensions must be positive, e.g. 1,3,224,224")
    return shape


def random_inputs(shapes: Sequence[Sequence[int]], *, batch: int | None = None, seed: int = 0) -> list[Tensor]:
    """Seeded standard-normal float32 tensors of the given shapes (batch dim replaced by ``batch`` if given)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        shape = tuple(shape)
        if batch is not None:
            shape = (batch,) + shape[1:]
        out.append(torch.randn(shape, generator=generator))
    return out


def run_model(model: nn.Module, inputs: Sequence[Tensor]) -> Any:
    """``model(*inputs)`` without autograd; a failure names the innermost module that raised it."""
    running: list[str] = []  # modules entered and not yet returned; on failure the last one raised
    names = {module: name or "<model>" for name, module in model.named_modules()}

    def enter(module: nn.Module, args: Any) -> None:
        running.append(names.get(module, type(module).__name__))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure inside user code becomes a clear bad-input error
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        where = running[-1] if running else "<model>"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInputError(
            f"the model rejects input shape {shapes}: layer '{where}' failed: {detail}; pass the shape the model expects with --input-shape"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
