"""The training step: eager on fused kernels, traced as registered ops; and which implementation computes it.

Eager (:func:`train_step` outside tracing), an autograd Function runs the fused passes of an
implementation: the whole forward in one call, the whole backward in another (the native kernels
read the activations once each way). Dispatching a Python custom op costs tens of microseconds
per step, which the dense layer, already bound by per-call overhead, would feel.

Traced (``torch.compile``, ``torch.export``), the step is two registered functional ops with
the elementwise work between them left to the compiler:

- ``onorm::train_statistics(x, mean, var, u, v, alpha_now, <settings>) -> (center, inv_k, d, s, mean_new, var_new)``:
  the forward's per-sample statistics (each ``(N, C)``) and the new state;
- the graph computes ``z = clamp((x - center) * inv_k * gamma + beta)``, so the compiler fuses
  it with what follows (a ReLU's mask is recomputed from the conv's output, as for BatchNorm,
  instead of stored), and differentiates it: ``gz * gamma / k``, and the gradients of
  ``center`` and ``inv_k``, which are the per-sample sums of ``g = gamma * gz`` and ``g * (x - center)``;
- the first op's autograd formula calls
  ``onorm::train_control(sum_g, sum_g_xc, center, inv_k, d, s, u, v, <settings>) -> (xc_coef, const, u_new, v_new)``,
  the backward's u/v update, writes ``u_new``/``v_new`` into ``u``/``v`` (the buffers it was
  given) and adds ``(x - center) * xc_coef + const`` to x's gradient (with ``projection="batch"``,
  a batch of two or more gets :func:`.functional.batch_projection`'s coefficients instead).

The caller writes ``mean_new`` and ``var_new`` into its buffers ``mean``/``var``. Neither op
mutates an input. A new state that is not finite raises
:class:`.functional.OnlineNormStateError` from inside the op that computes it, before anything is written.
``alpha_now`` is an adaptive layer's forward decay (a 0-dim tensor, :mod:`.adaptive_alpha`),
None for a fixed one, whose ``alpha_fwd`` is among the settings; the ops read it when they run.

The implementation, chosen by the backend that the environment variable ``ONORM_BACKEND`` names
(read once) and :func:`implementation` applies per tensor:

- unset (or ``auto``): CPU tensors on the native kernels (:mod:`.native`) where they build,
  CUDA tensors on the Triton kernels (:mod:`.triton_kernels`) where triton imports, the
  scans (:mod:`.functional`) for the rest;
- ``native``: CPU tensors on the native kernels (an error where they cannot be built), the
  scans elsewhere;
- ``triton``: CUDA tensors on the Triton kernels, the scans elsewhere; or, with
  ``TRITON_INTERPRET=1`` set before first use, CPU tensors instead, on the same kernels run by
  Triton's interpreter (slow: for testing them without a GPU). An error where triton does
  not import, or where there is neither a CUDA device nor the interpreter. The traced ops take
  the scans' statistics and control (cheap, per-sample work; the compiler writes the rest);
- ``scans``: the scans everywhere.

A choice that cannot run here is a :class:`BackendError`, not a fallback. :func:`set_backend`
changes the choice in-process, for tests and debugging.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .functional import (
    BATCH,
    STABLE,
    as_channels_by_positions,
    check_state,
    clamp_bound,
    clamp_limit,
    scan_backward,
    scan_control,
    scan_forward,
    scan_statistics,
    stat_dtype,
)  # fmt: skip

NATIVE, SCANS, TRITON, AUTO = "native", "scans", "triton", "auto"
BACKENDS = (NATIVE, SCANS, TRITON)


class BackendError(RuntimeError):
    """The implementation ``ONORM_BACKEND`` (or :func:`set_backend`) names is unknown or unavailable here."""


class Implementation(NamedTuple):
    """One implementation of the training passes.

    ``forward``, ``backward``: the fused passes of the eager step, with the contract of
    :func:`.functional.scan_forward` and :func:`.functional.scan_backward`; ``statistics``,
    ``control``: the traced step's, with that of :func:`.functional.scan_statistics` and
    :func:`.functional.scan_control`. ``reads_any_float``: its fused passes take activations in
    their own dtype (half precision too) and compute in the statistics dtype; else they are
    converted to the statistics dtype first.
    """

    name: str
    forward: Callable
    backward: Callable
    statistics: Callable
    control: Callable
    reads_any_float: bool


_SCANS = Implementation(SCANS, scan_forward, scan_backward, scan_statistics, scan_control, False)
_NATIVE = Implementation(NATIVE, native.forward, native.backward, native.statistics, native.control, False)

# The backend's name and its implementation per device type (the scans for any other), resolved on
# first use: choosing "native" may build the kernels (seconds).
_backend: tuple[str, dict[str, Implementation]] | None = None


def backend() -> str:
    """The backend in use: ``"native"``, ``"scans"``, ``"triton"``, or ``"auto"`` (unset: the best available
    for each tensor). ``ONORM_BACKEND`` is read on the first call only."""
    return _resolved()[0]


def set_backend(name: str | None) -> str:
    """Use backend ``name`` from now on (None: ``"auto"``); returns it. :class:`BackendError` if it cannot run here."""
    global _backend
    choice = AUTO if name is None else name.strip().lower()
    _backend = choice, _implementations(choice, name)
    return choice


def implementation(x: Tensor) -> Implementation:
    """What computes the training passes of activations ``x``: the backend's choice for ``x``'s device, else the scans."""
    return _resolved()[1].get(x.device.type, _SCANS)


def _resolved() -> tuple[str, dict[str, Implementation]]:
    if _backend is None:
        set_backend(os.environ.get("ONORM_BACKEND") or None)
    return _backend


def _implementations(choice: str, name: str | None) -> dict[str, Implementation]:
    """Per device type, the implementation backend ``choice`` gives its tensors (``name``: as the user spelled it)."""
    if choice == AUTO:
        best = {"cpu": _NATIVE if native.library() is not None else _SCANS}
        if torch.cuda.is_available():
            with contextlib.suppress(BackendError):  # no Triton: CUDA tensors take the scans
                best["cuda"] = _triton().get("cuda", _SCANS)  # interpreted kernels are for CPU tensors
        return best
    if choice == SCANS:
        return {}
    if choice == NATIVE:
        if native.library() is None:
            reason = "no C++ compiler ($CXX, default g++)" if native.cxx_compiler() is None else "their build failed"
            raise BackendError(f"ONORM_BACKEND=native: the native kernels are unavailable here ({reason}); "
                               "unset ONORM_BACKEND to take the scans")  # fmt: skip
        return {"cpu": _NATIVE}
    if choice == TRITON:
        return _triton()
    raise BackendError(f"ONORM_BACKEND must be one of {', '.join(BACKENDS)} or {AUTO} (the same as unset: the best "
                       f"available); got {name!r}")  # fmt: skip


def _triton() -> dict[str, Implementation]:
    """The Triton kernels, for CUDA tensors (or CPU tensors where Triton's interpreter runs them).

    :class:`BackendError` where they cannot run here. Their module is imported only where they
    can: its ``@triton.jit`` decorators read ``TRITON_INTERPRET`` once, when it is imported.
    """
    unavailable = "ONORM_BACKEND=triton: the Triton kernels cannot run here"
    try:
        import triton

        interpreter = triton.knobs.runtime.interpret  # an older Triton has no knobs
    except (ImportError, AttributeError) as err:
        raise BackendError(f"{unavailable}: triton does not import, or is too old ({err}); pip install triton") from err
    if not (torch.cuda.is_available() or interpreter):
        raise BackendError(f"{unavailable}: no CUDA device, and TRITON_INTERPRET=1 (Triton's interpreter, which "
                           "runs them on CPU tensors, slowly) is not set; unset ONORM_BACKEND for the CPU kernels")  # fmt: skip
    from . import triton_kernels

    device = "cpu" if triton_kernels.INTERPRETED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"{unavailable}: no CUDA device, and the kernels were compiled, not interpreted "
                           "(TRITON_INTERPRET=1 was set only after their module was imported)")  # fmt: skip
    return {device: Implementation(TRITON, triton_kernels.forward, triton_kernels.backward, scan_statistics,
                                   scan_control, True)}  # fmt: skip


def _without_autocast(function):
    """Run ``function`` with autocast off: the scans' matrix products must stay in the statistics dtype."""

    @functools.wraps(function)
    def run(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args)

    return run


def _alpha(alpha_now: Tensor | None, alpha_fwd: float) -> float:
    """The forward decay a call uses: an adaptive layer's ``alpha_now`` (a 0-dim state tensor) where given, else ``alpha_fwd``.

    Read inside the ops, which tracing does not enter, so that a compiled model follows the
    layer's state rather than the value it held when traced.
    """
    return alpha_fwd if alpha_now is None else float(alpha_now)


# ---- The eager step: an implementation's fused passes -------------------------------------------


@_without_autocast
def forward_impl(x, weight, bias, mean, var, alpha, eps, clamp_value, clamp_mode, out_dtype, name):
    """``(z, mean_new, var_new)`` at forward decay ``alpha``: ``z`` shaped as ``x`` in ``out_dtype``, the new state
    in the statistics dtype."""
    dtype = stat_dtype(x, mean)
    run = implementation(x)
    x3 = as_channels_by_positions(x, _activations_dtype(run, x, out_dtype, dtype))
    mean, var = mean.to(dtype), var.to(dtype)
    gamma, offset = _affine(weight, bias, mean)
    limit = clamp_limit(clamp_value, clamp_mode, weight, bias)
    z, mean_new, var_new = run.forward(x3, mean, var, gamma, offset, alpha, eps, limit)
    check_state(name, {"running_mean": mean_new, "running_var": var_new}, forward=True)
    return z.reshape(x.shape).to(out_dtype), mean_new, var_new


@_without_autocast
def backward_impl(grad_z, x, weight, bias, mean, var, u, v, alpha, alpha_bkw, eps, clamp_value, clamp_mode, control,
                  projection, name):  # fmt: skip
    """``(grad_x, grad_weight, grad_bias, u_new, v_new)`` of the step :func:`forward_impl` took from state ``mean``,
    ``var``: ``grad_x`` as ``x``, the rest in the statistics dtype.

    Without an affine, ``grad_weight``/``grad_bias`` are those of a gamma of ones and a beta of zeros.
    """
    dtype = mean.dtype
    run = implementation(x)
    read_as = _activations_dtype(run, x, grad_z.dtype, dtype)  # grad_z: as z, in forward's out_dtype
    x3, g3 = as_channels_by_positions(x, read_as), as_channels_by_positions(grad_z, read_as)
    gamma, offset = _affine(weight, bias, mean)
    limit = clamp_limit(clamp_value, clamp_mode, weight, bias)
    args = (mean, var, gamma, offset, u.to(dtype), v.to(dtype), alpha, alpha_bkw, eps, limit, control == STABLE,
            _projects(projection, x))  # fmt: skip
    grad_x, grad_weight, grad_bias, u_new, v_new = run.backward(g3, x3, *args)
    check_state(name, {"u_ctrl": u_new, "v_ctrl": v_new}, forward=False, control=control)
    return grad_x.reshape(x.shape).to(x.dtype), grad_weight, grad_bias, u_new, v_new


def _projects(projection: str, x: Tensor) -> bool:
    """Whether x's gradient is projected within the batch. A batch of one keeps the doc's gradient: the fit over
    one sample would take a dense sample's gradient whole."""
    return projection == BATCH and x.shape[0] > 1


def _activations_dtype(run: Implementation, x: Tensor, out_dtype: torch.dtype, stat: torch.dtype) -> torch.dtype:
    """The dtype ``run`` reads ``x`` in: its own where ``run`` reads any float and ``z`` is wanted in it (no
    converted copy), else the statistics dtype ``stat`` (so backward, given ``z``'s gradient, reads what forward read)."""
    return x.dtype if run.reads_any_float and out_dtype == x.dtype else stat


def _affine(weight: Tensor | None, bias: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(gamma, beta)`` detached in ``like``'s dtype; ones and zeros without an affine."""
    gamma = torch.ones_like(like) if weight is None else weight.detach().to(like.dtype)
    offset = torch.zeros_like(like) if bias is None else bias.detach().to(like.dtype)
    return gamma, offset


class _EagerStep(torch.autograd.Function):
    """The step on an implementation's fused passes; u, v advance in place when backward runs."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode,
                control, projection, out_dtype, name):  # fmt: skip
        alpha = _alpha(alpha_now, alpha_fwd)
        z, mean_new, var_new = forward_impl(x, weight, bias, mean, var, alpha, eps, clamp_value, clamp_mode, out_dtype,
                                            name)  # fmt: skip
        # The state before the step, copied: the caller overwrites its buffers with the new one.
        dtype = mean_new.dtype
        ctx.save_for_backward(x, weight, bias, mean.to(dtype, copy=True), var.to(dtype, copy=True))
        # Not saved tensors: backward reads u, v as they are when it runs (a layer called twice runs
        # its backward twice, each advancing them) and writes them, which saved tensors forbid.
        ctx.u, ctx.v = u, v
        ctx.settings = (alpha, alpha_bkw, eps, clamp_value, clamp_mode, control, projection, name)
        ctx.mark_non_differentiable(mean_new, var_new)
        # detach(): the same memory without the view relation autograd forbids for a Function's
        # output that a following ReLU(inplace=True) modifies.
        return z.detach(), mean_new, var_new

    @staticmethod
    @once_differentiable  # ON's backward is not a derivative: differentiating it again raises
    def backward(ctx, grad_z, *_state_grads):
        x, weight, bias, mean, var = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, u_new, v_new = backward_impl(grad_z, x, weight, bias, mean, var, ctx.u, ctx.v,
                                                                     *ctx.settings)  # fmt: skip
        _advance_controls(ctx, u_new, v_new)
        grad_weight = None if weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if bias is None else grad_bias.to(bias.dtype)
        return grad_x, grad_weight, grad_bias, *(None,) * 14


def _advance_controls(ctx, u_new: Tensor, v_new: Tensor) -> None:
    """Write a backward's new u, v into the layer's buffers (``ctx.u``, ``ctx.v``, not saved tensors: see _EagerStep)."""
    with torch.no_grad():
        ctx.u.copy_(u_new)
        ctx.v.copy_(v_new)


# ---- The traced step: two registered ops, the elementwise work the compiler's -------------------


@torch.library.custom_op("onorm::train_statistics", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def train_statistics(
    x: Tensor, mean: Tensor, var: Tensor, u: Tensor, v: Tensor, alpha_now: Tensor | None, alpha_fwd: float,
    alpha_bkw: float, eps: float, control: str, projection: str, name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(center, inv_k, d, s, mean_new, var_new)`` of ON's training forward (see the module docstring).

    ``u``, ``v`` and the settings after ``eps`` are for its autograd formula.
    """
    out = _statistics(x, mean, var, _alpha(alpha_now, alpha_fwd), eps)
    check_state(name, {"running_mean": out[4], "running_var": out[5]}, forward=True)
    return tuple(_as_new(t) for t in out)


@_without_autocast
def _statistics(x, mean, var, alpha, eps):
    dtype = stat_dtype(x, mean)
    return implementation(x).statistics(as_channels_by_positions(x, dtype), mean.to(dtype), var.to(dtype), alpha, eps)


@train_statistics.register_fake
def _(x, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, control, projection, name):
    dtype = stat_dtype(x, mean)
    per_sample = [x.new_empty(x.shape[:2], dtype=dtype) for _ in range(4)]
    return *per_sample, mean.new_empty(mean.shape, dtype=dtype), mean.new_empty(mean.shape, dtype=dtype)


@torch.library.custom_op("onorm::train_control", mutates_args=())
def train_control(
    sum_g: Tensor, sum_g_xc: Tensor, center: Tensor, inv_k: Tensor, d: Tensor, s: Tensor, u: Tensor, v: Tensor,
    alpha_bkw: float, eps: float, count: int, control: str, project: bool, name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(xc_coef, const, u_new, v_new)``: ON's backward control (see the module docstring and :func:`.functional.scan_control`)."""
    dtype = sum_g.dtype
    out = _control(sum_g, sum_g_xc, center, inv_k, d, s, u.to(dtype), v.to(dtype), alpha_bkw, eps, count,
                   control == STABLE, project)  # fmt: skip
    check_state(name, {"u_ctrl": out[2], "v_ctrl": out[3]}, forward=False, control=control)
    return tuple(_as_new(t) for t in out)


@_without_autocast
def _control(sum_g, *args):
    return implementation(sum_g).control(sum_g, *args)


@train_control.register_fake
def _(sum_g, sum_g_xc, center, inv_k, d, s, u, v, alpha_bkw, eps, count, control, project, name):
    return (
        torch.empty_like(sum_g),
        torch.empty_like(sum_g),
        u.new_empty(u.shape, dtype=sum_g.dtype),
        u.new_empty(u.shape, dtype=sum_g.dtype),
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError("onorm::train_control cannot be differentiated: ON's backward is a controlled process, "
                       "not a derivative (as a function marked with @once_differentiable)")  # fmt: skip


train_control.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _as_new(t: Tensor) -> Tensor:
    """``t`` as the fake ops promise their outputs: contiguous, its own storage from offset 0 (a scan's last
    state is a view at an offset, and an output must not alias an input)."""
    return t.detach() if t.is_contiguous() and t.storage_offset() == 0 else t.contiguous().clone()


def _statistics_context(ctx, inputs, output) -> None:
    x, _, _, u, v, _, _, alpha_bkw, eps, control, projection, name = inputs
    ctx.save_for_backward(x, *output[:4])
    ctx.mark_non_differentiable(*output[2:])  # d, s and the new state: only center and inv_k shape z
    ctx.u, ctx.v = u, v  # read and written when backward runs (see _EagerStep)
    ctx.settings = (alpha_bkw, eps, control, projection, name)


def _statistics_backward(ctx, grad_center, grad_inv_k, *_state_grads):
    """x's gradient beyond the graph's own ``g / k``; advances ``u``, ``v`` in place."""
    x, center, inv_k, d, s = ctx.saved_tensors
    alpha_bkw, eps, control, projection, name = ctx.settings
    count = math.prod(x.shape[2:])
    # z = (x - center) * inv_k * gamma + beta, so these are -inv_k * sum(g) and sum(g * (x - center)) per sample.
    sum_g, sum_g_xc = -grad_center / inv_k, grad_inv_k
    xc_coef, const, u_new, v_new = train_control(sum_g, sum_g_xc, center, inv_k, d, s, ctx.u, ctx.v, alpha_bkw, eps,
                                                 count, control, _projects(projection, x), name)  # fmt: skip
    _advance_controls(ctx, u_new, v_new)
    per_sample = _per_sample_shape(x)
    grad_x = (x.to(center.dtype) - center.reshape(per_sample)) * xc_coef.reshape(per_sample)
    return (grad_x + const.reshape(per_sample)).to(x.dtype), *(None,) * 11


train_statistics.register_autograd(_statistics_backward, setup_context=_statistics_context)


def _per_sample_shape(x: Tensor) -> tuple[int, ...]:
    """``(N, C, 1, ...)``: an ``(N, C)`` tensor's shape to broadcast against ``x``."""
    return (*x.shape[:2], *(1,) * (x.ndim - 2))


def traced_step(x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode,
                control, projection, out_dtype, name) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The step as ``torch.compile`` and ``torch.export`` trace it: ``train_statistics`` and elementwise ops."""
    center, inv_k, _, _, mean_new, var_new = train_statistics(x, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps,
                                                              control, projection, name)  # fmt: skip
    per_sample = _per_sample_shape(x)
    scale = inv_k if weight is None else inv_k * weight.to(inv_k.dtype)
    z = (x.to(center.dtype) - center.reshape(per_sample)) * scale.reshape(per_sample)
    if bias is not None:
        # beta per sample: its gradient is then a per-sample sum, taken in the same pass as those of center and 1/k,
        # not a reduction over the whole batch of its own.
        z = z + bias.to(z.dtype).expand(center.shape).reshape(per_sample)
    if clamp_value is not None:
        limit = clamp_bound(clamp_value, clamp_mode, weight, bias)
        z = z.clamp(-limit, limit)
    return z.to(out_dtype), mean_new, var_new


def train_step(x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control,
               projection, out_dtype, name) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One training step of a layer: ``(z, mean_new, var_new)``; u, v advance in place when backward runs.

    ``z`` is shaped as ``x``, in ``out_dtype``. The registered ops while ``torch.compile`` or
    ``torch.export`` traces it (:func:`traced_step`), the fused passes in eager (:class:`_EagerStep`).
    """
    inputs = (x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control,
              projection, out_dtype, name)  # fmt: skip
    if torch.compiler.is_compiling():
        return traced_step(*inputs)
    return _EagerStep.apply(*inputs)
