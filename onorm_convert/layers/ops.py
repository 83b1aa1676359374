"""The training step as registered ops, and which implementation computes it.

Two functional ops, which ``torch.compile`` and ``torch.export`` trace as single nodes:

- ``onorm::train_forward(x, weight, bias, mean, var, u, v, alpha_now, <settings>) -> (z, mean_new, var_new, before)``;
- ``onorm::train_backward(grad_z, x, weight, bias, mean, var, u, v, alpha_now, <settings>)
  -> (grad_x, grad_weight, grad_bias, u_new, v_new)``, the backward of the first (with the setting
  ``projection="batch"``, ``grad_x`` of a batch of two or more is :func:`.functional.batch_projection`'s).

``alpha_now`` is an adaptive layer's forward decay (a 0-dim tensor, :mod:`.adaptive_alpha`),
None for a fixed one, whose ``alpha_fwd`` is among the settings.

The caller writes ``mean_new`` and ``var_new`` into its buffers ``mean``/``var``; the first
op's autograd formula gives the second ``before`` (a copy of ``mean`` and ``var`` as they
were, stacked, with an adaptive layer's alpha as a third row: an op's output, which a compiler
cannot replace by the buffer it copies) and
writes ``u_new``/``v_new`` into ``u``/``v`` (the buffers it was given) when backward runs.
Neither op mutates an input.
A new state that is not finite raises :class:`.functional.OnlineNormStateError` from
inside the op, before anything is written.

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
  not import, or where there is neither a CUDA device nor the interpreter;
- ``scans``: the scans everywhere.

A choice that cannot run here is a :class:`BackendError`, not a fallback. :func:`set_backend`
changes the choice in-process, for tests and debugging.

Eager calls skip the dispatcher: :func:`train_step` runs the same implementations through an
autograd Function (dispatching a Python custom op costs tens of microseconds per step, which
the dense layer, already bound by per-call overhead, would feel), and calls the op only while
``torch.compile`` or ``torch.export`` traces it.
"""

from __future__ import annotations

import contextlib
import functools
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
    clamp_limit,
    scan_backward,
    scan_forward,
    stat_dtype,
)  # fmt: skip

NATIVE, SCANS, TRITON, AUTO = "native", "scans", "triton", "auto"
BACKENDS = (NATIVE, SCANS, TRITON)


class BackendError(RuntimeError):
    """The implementation ``ONORM_BACKEND`` (or :func:`set_backend`) names is unknown or unavailable here."""


class Implementation(NamedTuple):
    """One implementation of the training passes, with the contract of :func:`.functional.scan_forward` and
    :func:`.functional.scan_backward`.

    ``reads_any_float``: it takes activations in their own dtype (half precision too) and
    computes in the statistics dtype; else they are converted to the statistics dtype first.
    """

    name: str
    forward: Callable
    backward: Callable
    reads_any_float: bool


_SCANS = Implementation(SCANS, scan_forward, scan_backward, False)
_NATIVE = Implementation(NATIVE, native.forward, native.backward, False)

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
    return {device: Implementation(TRITON, triton_kernels.forward, triton_kernels.backward, True)}


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


@_without_autocast
def forward_impl(x, weight, bias, mean, var, alpha_now, alpha_fwd, eps, clamp_value, clamp_mode, out_dtype, name):
    """``(z, mean_new, var_new, before)``: ``z`` shaped as ``x`` in ``out_dtype``; the new state, and ``(mean, var)``
    stacked, in the statistics dtype, with an adaptive layer's ``alpha_now`` as a third row.

    Backward reads the alpha from there, an output of the op: a compiler may recompute a copy
    of the layer's ``alpha_now`` in backward from the buffer, which forward has moved on by then.
    """
    dtype = stat_dtype(x, mean)
    run = implementation(x)
    x3 = as_channels_by_positions(x, _activations_dtype(run, x, out_dtype, dtype))
    mean, var = mean.to(dtype), var.to(dtype)
    gamma, offset = _affine(weight, bias, mean)
    limit = clamp_limit(clamp_value, clamp_mode, weight, bias)
    z, mean_new, var_new = run.forward(x3, mean, var, gamma, offset, _alpha(alpha_now, alpha_fwd), eps, limit)
    check_state(name, {"running_mean": mean_new, "running_var": var_new}, forward=True)
    before = (mean, var) if alpha_now is None else (mean, var, alpha_now.to(dtype).expand(mean.shape))
    return z.reshape(x.shape).to(out_dtype), mean_new, var_new, torch.stack(before)


@_without_autocast
def backward_impl(grad_z, x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value,
                  clamp_mode, control, projection, name):  # fmt: skip
    """``(grad_x, grad_weight, grad_bias, u_new, v_new)``: ``grad_x`` as ``x``, the rest in the statistics dtype.

    Without an affine, ``grad_weight``/``grad_bias`` are those of a gamma of ones and a beta of zeros.
    """
    dtype = mean.dtype
    run = implementation(x)
    read_as = _activations_dtype(run, x, grad_z.dtype, dtype)  # grad_z: as z, in forward's out_dtype
    x3, g3 = as_channels_by_positions(x, read_as), as_channels_by_positions(grad_z, read_as)
    gamma, offset = _affine(weight, bias, mean)
    limit = clamp_limit(clamp_value, clamp_mode, weight, bias)
    alpha = _alpha(alpha_now, alpha_fwd)
    # A batch of one keeps the doc's gradient: the fit over one sample would take a dense sample's gradient whole.
    project = projection == BATCH and x.shape[0] > 1
    args = (
        mean,
        var,
        gamma,
        offset,
        u.to(dtype),
        v.to(dtype),
        alpha,
        alpha_bkw,
        eps,
        limit,
        control == STABLE,
        project,
    )
    grad_x, grad_weight, grad_bias, u_new, v_new = run.backward(g3, x3, *args)
    check_state(name, {"u_ctrl": u_new, "v_ctrl": v_new}, forward=False, control=control)
    return grad_x.reshape(x.shape).to(x.dtype), grad_weight, grad_bias, u_new, v_new


def _activations_dtype(run: Implementation, x: Tensor, out_dtype: torch.dtype, stat: torch.dtype) -> torch.dtype:
    """The dtype ``run`` reads ``x`` in: its own where ``run`` reads any float and ``z`` is wanted in it (no
    converted copy), else the statistics dtype ``stat`` (so backward, given ``z``'s gradient, reads what forward read)."""
    return x.dtype if run.reads_any_float and out_dtype == x.dtype else stat


def _affine(weight: Tensor | None, bias: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(gamma, beta)`` detached in ``like``'s dtype; ones and zeros without an affine."""
    gamma = torch.ones_like(like) if weight is None else weight.detach().to(like.dtype)
    offset = torch.zeros_like(like) if bias is None else bias.detach().to(like.dtype)
    return gamma, offset


# ---- The registered ops -------------------------------------------------------------------------


@torch.library.custom_op("onorm::train_forward", mutates_args=())
def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, u: Tensor, v: Tensor,
    alpha_now: Tensor | None, alpha_fwd: float, alpha_bkw: float, eps: float, clamp_value: float | None,
    clamp_mode: str, control: str, projection: str, out_dtype: torch.dtype, name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """ON's training forward (see the module docstring); ``u``, ``v`` are for its backward."""
    z, *state = forward_impl(x, weight, bias, mean, var, alpha_now, alpha_fwd, eps, clamp_value, clamp_mode, out_dtype,
                             name)  # fmt: skip
    return _as_promised(z, x), *(_as_promised(t, t) for t in state)


@train_forward.register_fake
def _(x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control,
      projection, out_dtype, name):  # fmt: skip
    dtype = stat_dtype(x, mean)
    new_state = [mean.new_empty(mean.shape, dtype=dtype) for _ in range(2)]
    rows = 2 if alpha_now is None else 3
    return torch.empty_like(x, dtype=out_dtype), *new_state, mean.new_empty((rows, *mean.shape), dtype=dtype)


@torch.library.custom_op("onorm::train_backward", mutates_args=())
def train_backward(
    grad_z: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, u: Tensor,
    v: Tensor, alpha_now: Tensor | None, alpha_fwd: float, alpha_bkw: float, eps: float, clamp_value: float | None,
    clamp_mode: str, control: str, projection: str, name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """ON's training backward: the gradients of ``x``, ``weight``, ``bias`` and the new ``u``, ``v``."""
    grad_x, *rest = backward_impl(grad_z, x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps,
                                  clamp_value, clamp_mode, control, projection, name)  # fmt: skip
    return _as_promised(grad_x, x), *(_as_promised(t, t) for t in rest)


@train_backward.register_fake
def _(grad_z, x, weight, bias, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control,
      projection, name):  # fmt: skip
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
    x, weight, bias, _, _, u, v, _, alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control, projection, _, name = (
        inputs
    )
    ctx.save_for_backward(x, weight, bias, output[3])
    # Not saved tensors: backward reads u, v as they are when it runs (a layer called twice runs
    # its backward twice, each advancing them) and writes them, which saved tensors forbid.
    ctx.u, ctx.v = u, v
    ctx.settings = (alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control, projection, name)


def _backward(ctx, grad_z, *_state_grads, run_backward=train_backward):
    """The gradients of ``train_forward``'s inputs; advances ``u``, ``v`` in place."""
    x, weight, bias, before = ctx.saved_tensors
    mean, var, *alpha_row = before  # the alpha an adaptive layer's forward used (see forward_impl)
    alpha_now = alpha_row[0][0] if alpha_row else None
    grad_x, grad_weight, grad_bias, u_new, v_new = run_backward(grad_z, x, weight, bias, mean, var, ctx.u, ctx.v,
                                                                alpha_now, *ctx.settings)  # fmt: skip
    with torch.no_grad():
        ctx.u.copy_(u_new)
        ctx.v.copy_(v_new)
    grad_weight = None if weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if bias is None else grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias, *(None,) * 14


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
        (
            x,
            weight,
            bias,
            mean,
            var,
            _,
            _,
            alpha_now,
            alpha_fwd,
            _,
            eps,
            clamp_value,
            clamp_mode,
            _,
            _,
            out_dtype,
            name,
        ) = inputs
        z, *state = forward_impl(x, weight, bias, mean, var, alpha_now, alpha_fwd, eps, clamp_value, clamp_mode,
                                 out_dtype, name)  # fmt: skip
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
