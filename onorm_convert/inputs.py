"""Example inputs: parsing ``--input-shape``, seeded random batches, ``--inputs`` files, and running a model on them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import BadInputError, first_line

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
        detail = first_line(err)
        raise BadInputError(
            f"the model rejects input shape {shapes}: layer '{where}' failed: {detail}; pass the shape the model expects with --input-shape"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def load_input_file(path: Path) -> list[Tensor]:
    """The arrays of an ``--inputs`` file, in order, as tensors (never unpickling).

    ``.npy``: one array; ``.npz``: its arrays in stored order; anything else: a tensor, or a
    list/tuple/dict of tensors saved with ``torch.save``, read with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"--inputs {path}: no such file; give a .npy, .npz or torch.save'd tensor file")
    try:
        if path.suffix == ".npy":
            arrays = [np.load(path, allow_pickle=False)]
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = [archive[name] for name in archive.files]
        else:
            arrays = _tensors_in(torch.load(path, map_location="cpu", weights_only=True), path)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable or unsafe content is bad input
        detail = first_line(err)
        raise BadInputError(f"--inputs {path}: cannot read it ({detail}); give a .npy, .npz or a torch.save'd tensor/dict") from err
    return [torch.as_tensor(array) for array in arrays]


def _tensors_in(obj: Any, path: Path) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    values = list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple)) else None
    if not values or not all(isinstance(value, Tensor) for value in values):
        raise BadInputError(f"--inputs {path}: holds {type(obj).__name__}, not a tensor or a list/tuple/dict of tensors")
    return values


def fit_inputs(
    tensors: Sequence[Tensor], shapes: Sequence[Sequence[int]], source: str, static_batch: bool = False
) -> list[Tensor]:
    """Check real inputs against the declared input shapes; floats become float32.

    Any batch size fits, unless ``static_batch`` fixes it to the declared one. Raises
    BadInputError naming ``source`` when the count, a rank, a dimension or a value
    (NaN/Inf) does not fit.
    """
    if len(tensors) != len(shapes):
        raise BadInputError(f"{source}: holds {len(tensors)} arrays but the model takes {len(shapes)} inputs; give one array per input")
    fitted = []
    for index, (tensor, shape) in enumerate(zip(tensors, shapes)):
        expected = "(N, " + ", ".join(map(str, shape[1:])) + ")" if len(shape) > 1 else "(N,)"
        if tensor.ndim != len(shape) or tuple(tensor.shape[1:]) != tuple(shape[1:]) or tensor.shape[0] == 0:
            raise BadInputError(f"{source}: input {index} has shape {tuple(tensor.shape)}, expected {expected}; save arrays of that shape")
        if static_batch and tensor.shape[0] != shape[0]:
            raise BadInputError(
                f"{source}: input {index} has batch {tensor.shape[0]} but --static-batch fixes it to {shape[0]}; "
                "drop --static-batch or give inputs of that batch"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
            if not torch.isfinite(tensor).all():
                raise BadInputError(f"{source}: input {index} contains NaN or Inf; give finite inputs")
        fitted.append(tensor)
    return fitted
