"""The training step as registered ops, and which implementation computes it.

Two functional ops, which ``torch.compile`` and ``torch.export`` trace as single nodes:

- ``onorm::train_forward(x, weight, bias, mean, var, u, v, <settings>) -> (z, mean_new, var_new, before)``;
- ``onorm::train_backward(grad_z, x, weight, bias, mean, var, u, v, <settings>)
  -> (grad_x, grad_weight, grad_bias, u_new, v_new)``, the backward of the first.

The caller writes ``mean_new`` and ``var_new`` into its buffers ``mean``/``var``; the first
op's autograd formula gives the second ``before`` (a copy of ``mean`` and ``var`` as they
were, stacked: an op's output, which a compiler cannot replace by the buffer it copies) and
writes ``u_new``/``v_new`` into ``u``/``v`` (the buffers it was given) when backward runs.
Neither op mutates an input.
A new state that is not finite raises :class:`.functional.OnlineNormStateError` from
inside the op, before anything is written.

The implementation: the native kernels (:mod:`.native`) for CPU tensors, the scans
(:mod:`.functional`) everywhere else, as chosen once by the environment variable
``ONORM_BACKEND``: ``native`` (CPU tensors on the native kernels, an error where they cannot
be built), ``scans`` (the scans everywhere), ``triton`` (not in this version: an error), or
unset (the native kernels where they build, else the scans). :func:`set_backend` changes the
choice in-process, for tests and debugging.

Eager calls skip the dispatcher: :func:`train_step` runs the same implementations through an
autograd Function (dispatching a Python custom op costs tens of microseconds per step, which
the dense layer, already bound by per-call overhead, would feel), and calls the op only while
``torch.compile`` or ``torch.export`` traces it.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .functional import (
    STABLE,
    as_channels_by_positions,
    check_state,
    clamp_limit,
    scan_backward,
    scan_forward,
    stat_dtype,
)  # fmt: skip

NATIVE, SCANS, TRITON = "native", "scans", "triton"
BACKENDS = (NATIVE, SCANS, TRITON)


class BackendError(RuntimeError):
    """The implementation ``ONORM_BACKEND`` (or :func:`set_backend`) names is unknown or unavailable here."""


_backend: str | None = None  # resolved on first use: choosing "native" may build the kernels (seconds)


def backend() -> str:
    """The implementation in use: ``"native"`` or ``"scans"`` (``ONORM_BACKEND``, read on the first call only)."""
    return _backend or set_backend(os.environ.get("ONORM_BACKEND") or None)


def set_backend(name: str | None) -> str:
    """Use implementation ``name`` from now on (None: the best available); returns it. :class:`BackendError` if it cannot run here."""
    global _backend
    _backend = _available(name)
    return _backend


def _available(name: str | None) -> str:
    if name is None:
        return NATIVE if native.library() is not None else SCANS
    choice = name.strip().lower()
    if choice == SCANS:
        return SCANS
    if choice == NATIVE:
        if native.library() is None:
            reason = "no C++ compiler ($CXX, default g++)" if native.cxx_compiler() is None else "their build failed"
            raise BackendError(f"ONORM_BACKEND=native: the native kernels are unavailable here ({reason}); "
                               "unset ONORM_BACKEND to take the scans")  # fmt: skip
        return NATIVE
    if choice == TRITON:
        raise BackendError("ONORM_BACKEND=triton: this version has no Triton kernels; use native or scans")
    raise BackendError(f"ONORM_BACKEND must be one of {', '.join(BACKENDS)}, or unset for the best available; got {name!r}")  # fmt: skip


def use_native(x3: Tensor) -> bool:
    """Whether activations ``x3`` (``(N, C, S)``) take the native kernels: the backend is native and they support it."""
    return backend() == NATIVE and native.supports(x3)


def _without_autocast(function):
    """Run ``function`` with autocast off: the scans' matrix products must stay in the statistics dtype."""

    @functools.wraps(function)
    def run(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args)

    return run


@_without_autocast
def forward_impl(x, weight, bias, mean, var, alpha_fwd, eps, clamp_value, clamp_mode, out_dtype, name):
    """``(z, mean_new, var_new, before)``: ``z`` shaped as ``x`` in ``out_dtype``; the new state, and ``(mean, var)``
    stacked, in the statistics dtype."""
    dtype = stat_dtype(x, mean)
    x3 = as_channels_by_positions(x, dtype)
    mean, var = mean.to(dtype), var.to(dtype)
    gamma, offset = _affine(weight, bias, mean)
    limit = clamp_limit(clamp_value, clamp_mode, weight, bias)
    run = native.forward if use_native(x3) else scan_forward
    z, mean_new, var_new = run(x3, mean, var, gamma, offset, alpha_fwd, eps, limit)
    check_state(name, {"running_mean": mean_new, "running_var": var_new}, forward=True)
    return z.reshape(x.shape).to(out_dtype), mean_new, var_new, torch.stack((mean, var))


@_without_autocast
def backward_impl(grad_z, x, weight, bias, mean, var, u, v, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode,
                  control, name):  # fmt: skip
    """``(grad_x, grad_weight, grad_bias, u_new, v_new)``: ``grad_x`` as ``x``, the rest in the statistics dtype.

    Without an affine, ``grad_weight``/``grad_bias`` are those of a gamma of ones and a beta of zeros.
    """
    dtype = mean.dtype
    x3, g3 = as_channels_by_positions(x, dtype), as_channels_by_positions(grad_z, dtype)
    gamma, offset = _affine(weight, bias, mean)
    limit = clamp_limit(clamp_value, clamp_mode, weight, bias)
    run = native.backward if use_native(x3) else scan_backward
    args = (mean, var, gamma, offset, u.to(dtype), v.to(dtype), alpha_fwd, alpha_bkw, eps, limit, control == STABLE)
    grad_x, grad_weight, grad_bias, u_new, v_new = run(g3, x3, *args)
    check_state(name, {"u_ctrl": u_new, "v_ctrl": v_new}, forward=False, control=control)
    return grad_x.reshape(x.shape).to(x.dtype), grad_weight, grad_bias, u_new, v_new


def _affine(weight: Tensor | None, bias: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(gamma, beta)`` detached in ``like``'s dtype; ones and zeros without an affine."""
    gamma = torch.ones_like(like) if weight is None else weight.detach().to(like.dtype)
    offset = torch.zeros_like(like) if bias is None else bias.detach().to(like.dtype)
    return gamma, offset


# ---- The registered ops -------------------------------------------------------------------------


@torch.library.custom_op("onorm::train_forward", mutates_args=())
def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, u: Tensor, v: Tensor,
    alpha_fwd: float, alpha_bkw: float, eps: float, clamp_value: float | None, clamp_mode: str, control: str,
    out_dtype: torch.dtype, name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """ON's training forward (see the module docstring); ``u``, ``v`` are for its backward."""
    z, *state = forward_impl(x, weight, bias, mean, var, alpha_fwd, eps, clamp_value, clamp_mode, out_dtype, name)
    return _as_promised(z, x), *(_as_promised(t, t) for t in state)


@train_forward.register_fake
def _(x, weight, bias, mean, var, u, v, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control, out_dtype, name):
    dtype = stat_dtype(x, mean)
    new_state = [mean.new_empty(mean.shape, dtype=dtype) for _ in range(2)]
    return torch.empty_like(x, dtype=out_dtype), *new_state, mean.new_empty((2, *mean.shape), dtype=dtype)


@torch.library.custom_op("onorm::train_backward", mutates_args=())
def train_backward(
    grad_z: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, u: Tensor,
    v: Tensor, alpha_fwd: float, alpha_bkw: float, eps: float, clamp_value: float | None, clamp_mode: str,
    control: str, name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """ON's training backward: the gradients of ``x``, ``weight``, ``bias`` and the new ``u``, ``v``."""
    grad_x, *rest = backward_impl(grad_z, x, weight, bias, mean, var, u, v, alpha_fwd, alpha_bkw, eps, clamp_value,
                                  clamp_mode, control, name)  # fmt: skip
    return _as_promised(grad_x, x), *(_as_promised(t, t) for t in rest)


@train_backward.register_fake
def _(grad_z, x, weight, bias, mean, var, u, v, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control, name):
    per_channel = [mean.new_empty(mean.shape) for _ in range(4)]
    return torch.empty_like(x), *per_channel


def _as_promised(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (shaped as ``like``) laid out as ``torch.empty_like(like)``, which the fake ops promise: its
    strides, its own storage from offset 0.

    The implementations' outputs mostly are; those at an offset (a scan's last state) and in
    other layouts (the native kernels' output for a transposed dense input) are copied.
    """
    promised = torch.empty_like(like, dtype=t.dtype, device="meta")
    if t.stride() == promised.stride() and t.storage_offset() == 0:
        return t.detach()  # not a view: an op's output that a following ReLU(inplace=True) may modify
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, _, u, v, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control, _, name = inputs
    ctx.save_for_backward(x, weight, bias, output[3])
    # Not saved tensors: backward reads u, v as they are when it runs (a layer called twice runs
    # its backward twice, each advancing them) and writes them, which saved tensors forbid.
    ctx.u, ctx.v = u, v
    ctx.settings = (alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control, name)


def _backward(ctx, grad_z, *_state_grads, run_backward=train_backward):
    """The gradients of ``train_forward``'s inputs; advances ``u``, ``v`` in place."""
    x, weight, bias, (mean, var) = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, u_new, v_new = run_backward(grad_z, x, weight, bias, mean, var, ctx.u, ctx.v,
                                                                *ctx.settings)  # fmt: skip
    with torch.no_grad():
        ctx.u.copy_(u_new)
        ctx.v.copy_(v_new)
    grad_weight = None if weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if bias is None else grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias, *(None,) * 12


train_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("onorm::train_backward cannot be differentiated: ON's backward is a controlled process, "
                       "not a derivative (as a function marked with @once_differentiable)")  # fmt: skip


train_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- What the layers call -----------------------------------------------------------------------


class _EagerStep(torch.autograd.Function):
    """``train_forward`` without the dispatcher: the same implementations and autograd formula."""

    @staticmethod
    def forward(ctx, *inputs):
        x, weight, bias, mean, var, _, _, alpha_fwd, _, eps, clamp_value, clamp_mode, _, out_dtype, name = inputs
        z, *state = forward_impl(x, weight, bias, mean, var, alpha_fwd, eps, clamp_value, clamp_mode, out_dtype, name)
        _setup_context(ctx, inputs, (z, *state))
        ctx.mark_non_differentiable(*state)
        # detach(): the same memory without the view relation autograd forbids for a Function's
        # output that a following ReLU(inplace=True) modifies.
        return z.detach(), *state

    @staticmethod
    @once_differentiable  # ON's backward is not a derivative: differentiating it again raises
    def backward(ctx, grad_z, *state_grads):
        return _backward(ctx, grad_z, *state_grads, run_backward=backward_impl)


def train_step(*inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``train_forward(*inputs)``: the registered op while being traced, the same computation without it in eager."""
    if torch.compiler.is_compiling():
        return train_forward(*inputs)
    return _EagerStep.apply(*inputs)
