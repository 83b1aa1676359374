"""The passes over the activations, and when to run compiled code instead of eager ops.

On the scan path, training ON reads the activations twice forward (statistics, then
output) and twice backward (two sums, then the input gradient), like BatchNorm. The four
functions below are those passes; written as eager ops each becomes several, so on CPU the
layer compiles its whole forward and backward (these passes plus the per-batch statistics) with TorchInductor
into a few fused loops. :func:`kernel` decides: ``ONORM_COMPILE=auto`` (the default) for
float32 activations of at least ``COMPILE_MIN_ELEMENTS`` on CPU when a C++ compiler is
present, ``1`` for every float32 input, ``0`` never. Eager and compiled run the same
Python functions, so they compute the same thing. Before any of this, activations on CPU
take the native kernels of :mod:`.native` (:func:`use_native`), which need none of these
passes; ``ONORM_COMPILE=0`` turns those off too.

All take activations viewed as ``(N, C, S)`` and per-sample-per-channel coefficients
shaped ``(N, C, 1)``. The clamp mask is recomputed from ``x`` in backward rather than
stored: it costs arithmetic, not memory traffic, and survives an in-place ReLU on the output.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import native


def spatial_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel ``(mean, biased variance)`` over the last dim of ``x``.

    Two passes over each row (mean, then squared deviations): exact centering, and
    compiled it is an order of magnitude faster than the Welford loop of ``var_mean``.
    """
    mean = x.mean(dim=2)
    return mean, (x - mean.unsqueeze(2)).square().mean(dim=2)


def affine_clamp(x: Tensor, mean0: Tensor, drift: Tensor, scale: Tensor, offset: Tensor, limit: float) -> Tensor:
    """``clamp(xc * scale + offset, -limit, limit)``, ``xc = (x - mean0) - drift``; ``limit`` may be ``inf``."""
    return torch.clamp(((x - mean0) - drift) * scale + offset, -limit, limit)


def masked_grad_sums(grad, x, mean0, drift, scale, offset, limit) -> tuple[Tensor, Tensor]:
    """``(sum(gz), sum(gz * xc))`` over the last dim; ``gz`` is ``grad`` zeroed where the clamp cut.

    Centered (``xc`` as in :func:`affine_clamp`), so a channel with (near) zero variance
    loses no precision to cancellation.
    """
    xc = (x - mean0) - drift
    gz = torch.where((xc * scale + offset).abs() <= limit, grad, 0.0)
    return gz.sum(dim=2), (gz * xc).sum(dim=2)


def input_grad(grad, x, mean0, drift, scale, offset, limit, grad_coef, xc_coef, const) -> Tensor:
    """``gz * grad_coef + xc * xc_coef + const``, with ``xc``, ``gz`` as in :func:`masked_grad_sums`."""
    xc = (x - mean0) - drift
    gz = torch.where((xc * scale + offset).abs() <= limit, grad, 0.0)
    return gz * grad_coef + xc * xc_coef + const


_compiled: dict = {}  # function -> its compiled version, or False once compiling it failed


# Below this many activations a pass is dominated by per-op overhead, not memory traffic,
# and a compile (seconds, once per layout) would cost more than it saves.
COMPILE_MIN_ELEMENTS = 1 << 16


def _compile_setting() -> str:
    """``ONORM_COMPILE``: ``"auto"``, ``"0"`` (no compiled code at all) or anything else (compile)."""
    setting = os.environ.get("ONORM_COMPILE", "auto").lower()
    return "0" if setting in ("0", "false", "off", "no") else setting


def _compile_wanted(x: Tensor) -> bool:
    setting = _compile_setting()
    if setting == "0" or x.dtype != torch.float32:
        return False
    if setting == "auto":
        return x.device.type == "cpu" and x.numel() >= COMPILE_MIN_ELEMENTS and native.cxx_compiler() is not None
    return True


def use_native(x3: Tensor) -> bool:
    """Whether activations ``x3`` (``(N, C, S)``) take the native kernels (see :func:`.native.supports`).

    Any size: the kernels are built once per machine, not per shape, and have no per-op overhead.
    """
    return _compile_setting() != "0" and native.supports(x3)


def kernel(fn: Callable, x: Tensor) -> Callable:
    """``fn`` for activations like ``x``: its TorchInductor-compiled version where that pays, else ``fn``."""
    if not _compile_wanted(x) or _compiled.get(fn) is False:
        return fn
    if fn not in _compiled:
        _compiled[fn] = _guarded(fn, torch.compile(fn, dynamic=True))
    return _compiled[fn]


def _guarded(fn: Callable, compiled: Callable) -> Callable:
    """Run ``compiled``; if compilation itself fails, warn once and fall back to eager for good."""

    def run(*args):
        try:
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure must not stop training
            if _compiled.get(fn) is False:
                raise
            _compiled[fn] = False
            warnings.warn(
                f"onorm: torch.compile failed for {fn.__name__} ({type(err).__name__}); using eager kernels",
                stacklevel=3,
            )
            return fn(*args)

    return run
