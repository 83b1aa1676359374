"""Example inputs: parsing ``--input-shape``, seeded random batches, ``--inputs`` files, and running a model on them."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import BadInputError, first_line, quoted

_SHAPE = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` into a shape; every dimension a positive integer."""
    if not _SHAPE.match(text):
        raise BadInputError(f"--input-shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224")
    shape = tuple(int(part) for part in text.split(","))
    if any(dim == 0 for dim in shape):
        raise BadInputError(f"--input-shape {text!r}: dimensions must be positive, e.g. 1,3,224,224")
    check_input_size(shape, f"--input-shape {text!r}")
    return shape


_MAX_NUMEL = 2**63 - 1  # torch counts elements in int64


def check_input_size(shape: Sequence[int], source: str) -> None:
    """Refuse an example input of ``shape`` that torch cannot index or this machine cannot hold (float32)."""
    numel = math.prod(shape)
    if numel > _MAX_NUMEL:
        raise BadInputError(
            f"{source}: {numel:.3g} values per input, more than torch can index (2**63 - 1); pass a smaller --input-shape"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * numel > memory:
        raise BadInputError(
            f"{source}: {numel:,} values per input ({4 * numel / 2**30:.3g} GiB as float32), more than this machine's "
            f"{memory / 2**30:.3g} GiB of memory; pass a smaller --input-shape"
        )


def random_inputs(shapes: Sequence[Sequence[int]], *, batch: int | None = None, seed: int = 0) -> list[Tensor]:
    """Seeded standard-normal float32 tensors of the given shapes (batch dim replaced by ``batch`` if given).

    BadInputError naming the shape when one is too big to allocate (from --input-shape or recorded in a checkpoint).
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        shape = tuple(shape)
        if batch is not None:
            shape = (batch,) + shape[1:]
        source = f"an example input of shape {shape}"
        check_input_size(shape, source)
        try:
            out.append(torch.randn(shape, generator=generator))
        except (MemoryError, RuntimeError) as err:  # randn of a valid shape fails only for want of memory
            raise BadInputError(
                f"{source}: cannot be allocated ({first_line(err)}); pass a smaller --input-shape"
            ) from err
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
    source = f"--inputs {quoted(path)}"
    if not path.is_file():
        raise BadInputError(f"{source}: no such file; give a .npy, .npz or torch.save'd tensor file")
    try:
        if path.suffix in (".npy", ".npz"):
            arrays = _arrays_in(np.load(path, allow_pickle=False), path.suffix, source)
        else:
            arrays = _tensors_in(torch.load(path, map_location="cpu", weights_only=True), source)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable or unsafe content is bad input
        detail = first_line(err)
        raise BadInputError(
            f"{source}: cannot read it ({detail}); give a .npy, .npz or a torch.save'd tensor/dict"
        ) from err
    return [_float_tensor(array, f"{source}: input {index}") for index, array in enumerate(arrays)]


def _arrays_in(loaded: Any, suffix: str, source: str) -> list[Any]:
    """The arrays ``np.load`` read: one for a .npy file, every member of a .npz archive (which must all be arrays)."""
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        if suffix == ".npz":
            raise BadInputError(f"{source}: holds one .npy array, not an .npz archive; name it .npy")
        return [loaded]
    with loaded:
        if suffix == ".npy":
            raise BadInputError(f"{source}: is an .npz archive, not one .npy array; name it .npz")
        members = [(name, loaded[name]) for name in loaded.files]
    for name, member in members:
        if not isinstance(member, np.ndarray):
            raise BadInputError(
                f"{source}: member {name!r} is not a .npy array; keep only arrays in the archive (np.savez)"
            )
    return [member for _, member in members]


def _tensors_in(obj: Any, source: str) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    values = list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple)) else None
    if not values or not all(isinstance(value, Tensor) for value in values):
        raise BadInputError(f"{source}: holds {type(obj).__name__}, not a tensor or a list/tuple/dict of tensors")
    return values


_NUMPY_FLOATS = frozenset(np.dtype(kind) for kind in ("float16", "float32", "float64"))  # those torch holds


def _float_tensor(value: np.ndarray | Tensor, where: str) -> Tensor:
    """An input array as a dense CPU float tensor; BadInputError naming what it is instead.

    The model is exported and verified on float32 inputs, so integers, booleans, complex
    and quantized values are refused, not guessed at. A float array stored big-endian is
    read in native byte order (same values).
    """
    if isinstance(value, np.ndarray):
        native = value.dtype.newbyteorder("=")
        if native not in _NUMPY_FLOATS:
            raise BadInputError(
                f"{where} has dtype {value.dtype}; onorm verifies on floating-point inputs: save them as float32"
            )
        return torch.from_numpy(value.astype(native, copy=False))
    if value.layout != torch.strided:
        raise BadInputError(f"{where} is a {value.layout} tensor; save a dense one (tensor.to_dense())")
    if value.is_meta:
        raise BadInputError(f"{where} is a meta tensor, which holds no values; save the tensor with its data")
    if value.is_quantized or not value.is_floating_point():
        raise BadInputError(
            f"{where} has dtype {value.dtype}; onorm verifies on floating-point inputs: save them as float32"
        )
    return value


def fit_inputs(
    tensors: Sequence[Tensor], shapes: Sequence[Sequence[int]], source: str, static_batch: bool = False
) -> list[Tensor]:
    """Check real inputs against the declared input shapes; floats become float32.

    Any batch size fits, unless ``static_batch`` fixes it to the declared one. Raises
    BadInputError naming ``source`` when the count, a rank, a dimension or a value
    (NaN/Inf) does not fit.
    """
    if len(tensors) != len(shapes):
        raise BadInputError(
            f"{source}: holds {len(tensors)} arrays but the model takes {len(shapes)} inputs; give one array per input"
        )
    fitted = []
    for index, (tensor, shape) in enumerate(zip(tensors, shapes)):
        expected = "(N, " + ", ".join(map(str, shape[1:])) + ")" if len(shape) > 1 else "(N,)"
        if tensor.ndim != len(shape) or tuple(tensor.shape[1:]) != tuple(shape[1:]) or tensor.shape[0] == 0:
            raise BadInputError(
                f"{source}: input {index} has shape {tuple(tensor.shape)}, expected {expected}; save arrays of that shape"
            )
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
