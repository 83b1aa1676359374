"""What every pipeline stage needs to know about a model, its state and its outputs.

The neutral module below load -> convert -> fold -> export -> verify: each stage may use
it, and it uses none of them. One home each for: the tensors a model returns, the values
it holds (damaged or not), whether a subclass computes more than the class it extends,
running it in eval mode, and turning OnlineNorm's error compensation (ECM) off.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .errors import BadInputError
from .layers import OnlineNormBase
from .layers.functional import CLAMP, ECMS, NONE

# --- outputs -------------------------------------------------------------------------------------


def labelled_tensors(output: Any, label: str = "output") -> list[tuple[str, Tensor]]:
    """The tensors of a (nested) tuple/list/dict output, labelled by their path, in pytree order."""
    if isinstance(output, Tensor):
        return [(label, output)]
    if isinstance(output, (tuple, list)):
        return [item for index, value in enumerate(output) for item in labelled_tensors(value, f"{label}[{index}]")]
    if isinstance(output, Mapping):
        return [item for key, value in output.items() for item in labelled_tensors(value, f"{label}[{key!r}]")]
    return []  # constants (None, numbers) are not graph outputs


def check_returns_tensors(output: Any, which: str = "the model") -> None:
    """BadInputError when ``output`` holds no tensor (None, a number): there is nothing to convert, export or compare."""
    if not labelled_tensors(output):
        raise BadInputError(
            f"{which} returns no tensor (it returned {type(output).__name__}); onorm checks a model by its tensor outputs: "
            "return the output tensor(s) from forward"
        )


# --- values --------------------------------------------------------------------------------------


def non_finite_state(norm: nn.Module) -> str | None:
    """The first of ``running_mean``, ``running_var``, ``weight``, ``bias`` holding NaN/Inf, or None."""
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = getattr(norm, name, None)
        if isinstance(value, Tensor) and not torch.isfinite(value).all():
            return name
    return None


def check_model_values(model: nn.Module, before: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN/Inf, a negative running_var, or complex values.

    Without example inputs nothing else would notice: the file written would compute NaN,
    or silently drop the imaginary part. ``before`` names the step: "converting", "exporting".
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            continue
        if tensor.is_complex():
            raise BadInputError(
                f"'{name}' is complex ({tensor.dtype}); onorm takes real-valued models only: make it real before {before}"
            )
        damage = "contains NaN or Inf" if tensor.is_floating_point() and not torch.isfinite(tensor).all() else ""
        if not damage and name.rpartition(".")[2] == "running_var" and (tensor < 0).any():
            damage = "is negative, which a variance cannot be"
        if damage:
            raise BadInputError(f"'{name}' {damage}; the model is damaged, retrain or fix it before {before}")


# --- structure -----------------------------------------------------------------------------------


def swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Swap every occurrence of each module (keyed by ``id``) under ``model``; shared modules stay shared."""
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None and id(child) in replacements:
                parent._modules[name] = replacements[id(child)]
    return model


# --- subclasses ---------------------------------------------------------------------------------

# The direct state (parameters, buffers, submodules) of the classes a stage knows how to handle.
BATCH_NORM_STATE = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
NORM_ACT_STATE = BATCH_NORM_STATE | {"drop", "act"}  # timm's norm-act layers: the norm, then .drop, then .act
PRODUCER_STATE = frozenset({"weight", "bias"})  # Conv, ConvTranspose, Linear
# The methods a known class computes its output with: a subclass overriding one computes something else.
_COMPUTING_METHODS = ("forward", "_conv_forward", "frozen_forward")

Known = TypeVar("Known")


def nearest_known(module: nn.Module, known: Mapping[type | str, Known]) -> tuple[type, Known] | None:
    """The first class in ``module``'s MRO that ``known`` holds (by class or by class name), with its entry; None if none."""
    for cls in type(module).__mro__:
        entry = known.get(cls, known.get(cls.__name__))
        if entry is not None:
            return cls, entry
    return None


def added_behaviour(module: nn.Module, base: type, holds: Collection[str]) -> str:
    """Why ``module`` computes more than ``base``, a class in its MRO whose direct state is ``holds`` ("" if it does not).

    The one rule for "a subclass that computes more": it overrides a method ``base`` computes
    its output with, or holds a parameter, buffer or submodule ``base`` does not. Such a module
    is left as it is (never converted or folded as a plain ``base``) and exported as its own ops.
    """
    kind = type(module).__name__
    overridden = [name for name in _COMPUTING_METHODS if _overrides(type(module), base, name)]
    if overridden:
        return f"{kind} overrides {overridden[0]} (it does more than {base.__name__})"
    extra = sorted(_direct_state(module) - set(holds))
    if extra:
        return f"{kind} holds more than {base.__name__} ({', '.join(map(repr, extra))})"
    return ""


def _overrides(cls: type, base: type, name: str) -> bool:
    return hasattr(base, name) and getattr(cls, name) is not getattr(base, name)


def _direct_state(module: nn.Module) -> set[str]:
    return {*module._parameters, *module._buffers, *module._modules}


# --- modes ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside; every submodule's training flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def ecm_off(*modules: nn.Module, ecms: Iterable[str] = ECMS) -> Iterator[None]:
    """Every OnlineNorm under ``modules`` whose ECM is one of ``ecms`` computes with ``ecm="none"`` inside; restored after."""
    changed = _turn_ecm_off(modules, ecms)
    try:
        yield
    finally:
        for layer, ecm in changed:
            layer.ecm = ecm


def strip_clamps(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose OnlineNorm clamps are removed (the reference for a stripped export)."""
    stripped = copy.deepcopy(model).eval()
    _turn_ecm_off([stripped], (CLAMP,))
    return stripped


def _turn_ecm_off(modules: Iterable[nn.Module], ecms: Iterable[str]) -> list[tuple[OnlineNormBase, str]]:
    """Set ``ecm="none"`` on every OnlineNorm under ``modules`` whose ECM is in ``ecms``; the layers changed, with their ECM."""
    ecms = set(ecms)
    layers = {
        id(m): m for module in modules for m in module.modules() if isinstance(m, OnlineNormBase) and m.ecm in ecms
    }
    changed = [(layer, layer.ecm) for layer in layers.values()]
    for layer, _ in changed:
        layer.ecm = NONE
    return changed
