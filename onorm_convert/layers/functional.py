"""The Online Normalization computation: training (streaming) and eval (frozen).

The equations are those of ``shared/docs/online-norm.md``. Training mode treats the
samples of a batch as a stream in index order. Every per-sample recurrence is linear
in its state, so each is evaluated for the whole batch by :func:`linear_scan` on the
``(N, C)`` per-sample statistics; the activations themselves are read in two passes
forward, as BatchNorm does, and backward in two more besides (see :mod:`.kernels`), since
backward recomputes the per-sample statistics rather than keep them. On CPU the native
kernels run instead (:mod:`.native`): one pass each way, a sequential scan per channel.
Which runs, eager and under the registered ops a compiled model traces, is :mod:`.ops`'s business.

Notation (per sample ``t`` and channel): ``m``/``s`` are the spatial mean and biased
variance of ``x``, ``mu_prev``/``var_prev`` the streaming statistics before the sample,
``k = sqrt(var_prev + eps)``, ``y = (x - mu_prev) / k``, ``z = gamma * y + beta``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .kernels import affine_clamp, input_grad, masked_grad_sums, spatial_stats
from .scan import linear_scan

CLAMP, LAYER_SCALING, NONE = "clamp", "layer_scaling", "none"
ECMS = (CLAMP, LAYER_SCALING, NONE)
# How v advances per sample (see backward_statistics): the doc's explicit step, or its implicit
# (backward Euler) form, whose decay 1 / (1 + (1 - alpha_bkw) * mean(y^2)) stays in (0, 1].
EXACT, STABLE = "exact", "stable"
CONTROLS = (EXACT, STABLE)
# How the clamp bounds z: by the doc's fixed clamp_value, or by the bound it implies through the affine (clamp_limit).
FIXED, AFFINE = "fixed", "affine"
CLAMP_MODES = (FIXED, AFFINE)
# The input gradient of a batch of two samples or more: the doc's (the controls'), or BatchNorm's projection within
# the batch of the gradient with the statistics held constant (batch_projection). A batch of one gets the doc's.
BATCH = "batch"
PROJECTIONS = (NONE, BATCH)


class OnlineNormStateError(RuntimeError):
    """A layer's streaming state would become NaN/Inf (bad input, or a recurrence that ran away and overflowed).

    The layer's state is left as it was before the step.
    """


def stat_dtype(x: Tensor, state: Tensor) -> torch.dtype:
    """float64 if the input or the state is float64, else float32 (never half precision)."""
    return torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32


def check_state(name: str, new_state: dict[str, Tensor], forward: bool, control: str = EXACT) -> None:
    """Raise :class:`OnlineNormStateError` if a new state is not finite (one host sync per pass).

    A control that runs away (the exact v recurrence amplifying) is caught when it overflows its
    dtype: float32 state within a few steps (measured: 2e4, 8e11, 8e28, inf). A finite magnitude
    limit would also stop the doc's equations where they are still exact (float64 state).
    """
    finite = [_all_finite(t) for t in new_state.values()]
    if all(finite):
        return
    bad = next(key for key, ok in zip(new_state, finite) if not ok)
    raise OnlineNormStateError(f"OnlineNorm layer '{name}': {bad} became NaN/Inf in a training {_state_advice(forward, control)}; "
                               "the layer's state is left as it was before this step")  # fmt: skip


def _all_finite(t: Tensor) -> bool:
    """Whether every value of per-channel state ``t`` is finite. On CPU by numpy: a microsecond, where torch's
    ops take tens, on every layer's every pass (the dense layer is bound by such per-call costs)."""
    if t.device.type == "cpu":
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())  # the host sync


def _state_advice(forward: bool, control: str) -> str:
    """Where a bad state arose, what usually causes it there, and what to change."""
    if forward:
        return ("forward pass: the input holds NaN/Inf or overflows; check the layers before it and the learning rate "
                "(the model may be diverging)")  # fmt: skip
    cause = ("backward pass: the gradient holds NaN/Inf, or the control ran away and overflowed (the activations outgrew "
             "the running statistics until its decay 1 - (1 - alpha_bkw) * mean(y^2) fell below -1)")  # fmt: skip
    if control == EXACT:
        return (
            cause
            + "; use control='stable' (bounded decay), a smaller alpha_fwd (faster statistics) or a lower learning rate"
        )
    return cause + "; use a smaller alpha_fwd (faster statistics) or a lower learning rate"


def scan_forward(x3, mean0, var0, gamma, offset, alpha_fwd: float, eps: float, limit: float):
    """Training forward of activations ``x3`` (``(N, C, S)``) by the scans: ``(z, mean_last, var_last)``.

    ``z`` is the clamped affine output, shaped as ``x3``; ``mean_last``, ``var_last`` the stream's
    state after the batch. The contract of :func:`.native.forward`.
    """
    drift_prev, mean_last, var_last, inv_k = _sample_statistics(x3, mean0, var0, alpha_fwd, eps)[:4]
    z = affine_clamp(x3, *_z_coefficients(mean0, drift_prev, inv_k * gamma, offset), limit)
    return z, mean_last, var_last


def scan_backward(g3, x3, mean0, var0, gamma, offset, u0, v0, alpha_fwd, alpha_bkw, eps, limit, stable: bool = False,
                  project: bool = False):  # fmt: skip
    """Training backward of ``(N, C, S)`` activations by the scans: ``(grad_x, grad_weight, grad_bias, u_last, v_last)``.

    The contract of :func:`.native.backward`: the per-sample statistics are recomputed from ``x3``
    and the state before the batch, as the forward computed them, so nothing of them is kept
    between the passes. ``project`` (``projection="batch"``, which :mod:`.ops` gives a batch of two
    or more): ``grad_x`` by :func:`batch_projection`; u, v advance as the doc's either way.
    """
    drift_prev, _, _, inv_k, d, s = _sample_statistics(x3, mean0, var0, alpha_fwd, eps)
    z_coefs = _z_coefficients(mean0, drift_prev, inv_k * gamma, offset)
    sum_gz, sum_gz_xc = masked_grad_sums(g3, x3, *z_coefs, limit)
    control = STABLE if stable else EXACT
    stats = backward_statistics(sum_gz, sum_gz_xc, inv_k, d, s, gamma, u0, v0, alpha_bkw, x3.shape[2], control)
    grad_weight, grad_bias, u_last, v_last, xc_coef, const = stats
    if project:  # the means as their drift from mean0, as everything here
        xc_coef, const = batch_projection(sum_gz, sum_gz_xc, z_coefs[2][:, :, 0], drift_prev + d, s, drift_prev, eps,
                                          x3.shape[2])  # fmt: skip
    grad_coefs = (z_coefs[2], xc_coef.unsqueeze(2), const.unsqueeze(2))  # gz * gamma / k + xc * ... + ...
    grad_x = input_grad(g3, x3, *z_coefs, limit, *grad_coefs)
    return grad_x, grad_weight, grad_bias, u_last, v_last


def scan_statistics(x3, mean0, var0, alpha_fwd: float, eps: float):
    """The training forward's statistics of ``(N, C, S)`` activations by the scans (the traced step's, :mod:`.ops`).

    Returns ``(center, inv_k, d, s, mean_last, var_last)``: per sample and channel (each ``(N, C)``)
    the stream's mean before it (mu_prev), ``1 / k``, ``d = m - mu_prev`` and the biased spatial
    variance ``s``; then the state after the batch. ``z = (x - center) * inv_k * gamma + beta``, clamped.
    """
    drift_prev, mean_last, var_last, inv_k, d, s = _sample_statistics(x3, mean0, var0, alpha_fwd, eps)
    return mean0 + drift_prev, inv_k, d, s.expand_as(d), mean_last, var_last


def scan_control(sum_g, sum_g_xc, center, inv_k, d, s, u0, v0, alpha_bkw: float, eps: float, count: int, stable: bool,
                 project: bool):  # fmt: skip
    """The training backward's control by the scans, from per-sample statistics (``(N, C)``, as
    :func:`scan_statistics` gives them) and the sums over ``count`` positions of ``g = gamma * gz`` and
    ``g * (x - center)``: ``(xc_coef, const, u_last, v_last)``.

    u, v advance as :func:`backward_statistics` says (gamma folded into ``g``); the input gradient is
    ``g / k + (x - center) * xc_coef + const``, whose first term the traced step's graph gives itself.
    ``project``: the coefficients :func:`batch_projection` gives instead.
    """
    control = STABLE if stable else EXACT
    stats = backward_statistics(sum_g, sum_g_xc, inv_k, d, s, torch.ones_like(u0), u0, v0, alpha_bkw, count, control)
    _, _, u_last, v_last, xc_coef, const = stats
    if project:
        xc_coef, const = batch_projection(sum_g, sum_g_xc, inv_k, center + d, s, center, eps, count)
    return xc_coef, const, u_last, v_last


def project_within_batch(grad_x3: Tensor, x3: Tensor, eps: float) -> Tensor:
    """``grad_x3`` less, per channel, its components along the constant and along the centred input, within the batch.

    For ``(N, C, S)`` activations, over the N * S values of each channel: with ``xc = x - mean(x)``,
    ``grad - mean(grad) - xc * mean(grad * xc) / (mean(xc^2) + eps)``: BatchNorm's projection,
    applied after the fact (:func:`batch_projection` folds it into the passes instead).
    """
    dims = (0, 2)
    xc = x3 - x3.mean(dims, keepdim=True)
    along_xc = (grad_x3 * xc).mean(dims, keepdim=True) / ((xc * xc).mean(dims, keepdim=True) + eps)
    return grad_x3 - grad_x3.mean(dims, keepdim=True) - xc * along_xc


def batch_projection(sum_gz, sum_gz_xc, grad_coef, m, s, center, eps: float, count: int) -> tuple[Tensor, Tensor]:
    """``(xc_coef, const)`` (each ``(N, C)``) of the input gradient ``projection="batch"`` gives a batch of two or more.

    That gradient is ``P(gz * grad_coef)``: the gradient with the statistics held constant
    (``gz * gamma / k``, no controls), less per channel its least-squares fit on the constant and on
    ``x - mean(x)`` over the batch's N * S values (``eps`` added to the variance, as BatchNorm's exact
    gradient removes them). With ``xc = x - center`` per sample it is
    ``gz * grad_coef + xc * xc_coef + const``, so it needs no pass of its own: the fit follows from
    the per-sample sums ``sum_gz``, ``sum_gz_xc`` over the ``count`` positions, means ``m`` and
    biased variances ``s``. ``m`` and ``center`` may be measured from any common origin.
    """
    total = sum_gz.shape[0] * count
    batch_mean = m.mean(0)
    offset = center - batch_mean  # x - mean(x) = xc + offset, per sample
    batch_var = (s + (m - batch_mean).square()).mean(0)
    mean_grad = (grad_coef * sum_gz).sum(0) / total
    along_x = (grad_coef * (sum_gz_xc + offset * sum_gz)).sum(0) / total / (batch_var + eps)
    return -along_x.expand_as(offset), -mean_grad - along_x * offset


def _sample_statistics(x3, mean0, var0, alpha_fwd: float, eps: float):
    """The forward recurrences over the samples of ``x3``: ``(drift_prev, mean_last, var_last, inv_k, d, s)``.

    See :func:`forward_statistics`; ``s`` is each sample's biased spatial variance.
    """
    if x3.shape[2] == 1:  # dense: each sample's mean is its value, its variance 0 (no full-size copies)
        m, s = x3[:, :, 0], x3.new_zeros(())
    else:
        m, s = spatial_stats(x3)
    return *forward_statistics(m, s, mean0, var0, alpha_fwd, eps), s


def clamp_limit(clamp_value: float | None, clamp_mode: str, weight: Tensor | None, bias: Tensor | None) -> float:
    """The bound the clamp puts on z: ``inf`` without a clamp, ``clamp_value`` for ``"fixed"``, and for
    ``"affine"`` ``max(|beta| + clamp_value * |gamma|)`` over channels (``clamp_value`` without an affine)."""
    return math.inf if clamp_value is None else float(clamp_bound(clamp_value, clamp_mode, weight, bias))


def clamp_bound(clamp_value: float, clamp_mode: str, weight: Tensor | None, bias: Tensor | None) -> float | Tensor:
    """:func:`clamp_limit` of a clamp, without a host sync: for ``"affine"`` a detached 0-dim tensor (traceable)."""
    if clamp_mode == FIXED or weight is None:
        return clamp_value
    return (bias.abs() + clamp_value * weight.abs()).max().detach()


def forward_statistics(m, s, mean0, var0, alpha_fwd: float, eps: float):
    """The forward recurrences for a batch of per-sample statistics ``m``, ``s`` (``(N, C)``).

    The mean is scanned as its drift from ``mean0`` (mu_0, the stream's mean before the
    batch) and ``x - mu_prev`` later formed as ``(x - mu_0) - drift``: where the data sits at
    the stream's mean (a converted layer, a constant channel) every difference is then
    exactly zero instead of a rounding error that ``1 / sqrt(var + eps)`` would amplify.

    Returns ``(drift_prev, mean_last, var_last, inv_k, d)``: the drift before each sample,
    the state after the batch, ``1 / k`` and ``d = m - mu_prev``.
    """
    m_rel = m - mean0
    drift_prev, drift_last = linear_scan(alpha_fwd, (1 - alpha_fwd) * m_rel, torch.zeros_like(mean0))
    d = m_rel - drift_prev
    var_incr = (1 - alpha_fwd) * s + (alpha_fwd * (1 - alpha_fwd)) * d * d
    var_prev, var_last = linear_scan(alpha_fwd, var_incr, var0)
    return drift_prev, mean0 + drift_last, var_last, torch.rsqrt(var_prev + eps), d


def backward_statistics(
    sum_gz, sum_gz_xc, inv_k, d, s, gamma, u0, v0, alpha_bkw: float, count: int, control: str = EXACT
):
    """The backward recurrences, from the per-sample sums of ``gz`` and ``gz * (x - mu_prev)``.

    With ``g = gamma * gz`` (``gz``: the gradient at ``z`` where the clamp let it through),
    ``v`` and ``u`` follow from per-sample means of ``g * y``, ``y^2``, ``g`` and ``y``; then
    ``dL/dx = g'/k - (1-ab) u_prev`` with ``g' = g - (1-ab) v_prev y`` is affine in ``gz``
    and ``x - mu_prev``. ``control``: v advances by the doc's
    ``v = v_prev * (1 - (1-ab) mean(y^2)) + mean(g y)`` (``"exact"``), or by its implicit form
    ``v = (v_prev + mean(g y)) / (1 + (1-ab) mean(y^2))`` (``"stable"``: the same fixed point,
    a decay in (0, 1] however large y grows).

    Returns ``(grad_weight, grad_bias, u_last, v_last, xc_coef, const)``:
    ``dL/dx = gz * gamma / k + (x - mu_prev) * xc_coef + const``.
    """
    ab = alpha_bkw
    mean_gz_y = sum_gz_xc * (inv_k / count)  # mean over positions of gz * y
    mean_y2 = (s + d * d) * inv_k * inv_k
    if control == STABLE:
        v_decay = 1 / (1 + (1 - ab) * mean_y2)
        v_prev, v_last = linear_scan(v_decay, mean_gz_y * gamma * v_decay, v0)
    else:
        v_prev, v_last = linear_scan(1 - (1 - ab) * mean_y2, mean_gz_y * gamma, v0)
    mean_h = (sum_gz * (gamma / count) - (1 - ab) * v_prev * d * inv_k) * inv_k
    u_prev, u_last = linear_scan(ab, mean_h, u0)
    grad_weight = mean_gz_y.sum(0) * count
    grad_bias = sum_gz.sum(0)
    return grad_weight, grad_bias, u_last, v_last, -(1 - ab) * v_prev * inv_k * inv_k, -(1 - ab) * u_prev


def _z_coefficients(mean0: Tensor, drift: Tensor, scale: Tensor, offset: Tensor) -> tuple[Tensor, ...]:
    """The passes' ``(mean0, drift, scale, offset)``, shaped for ``(N, C, S)`` activations.

    ``z = ((x - mean0) - drift) * scale + offset``: ``mean0``, ``offset`` per channel, the rest per sample.
    """
    return mean0.reshape(1, -1, 1), drift.unsqueeze(2), scale.unsqueeze(2), offset.reshape(1, -1, 1)


def as_channels_by_positions(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as ``(N, C, positions)`` in ``dtype``; no copy whenever the layout allows (channels_last too).

    Detached: the implementations run inside an op or autograd Function and record no graph of their own.
    """
    x = x if x.dtype == dtype else x.to(dtype)
    return x.reshape(x.shape[0], x.shape[1], -1).detach()


def frozen_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float):
    """Per-channel ``(scale, shift)`` equal to eval-mode normalization + affine.

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def layer_scale(z: Tensor, eps: float) -> Tensor:
    """Layer scaling ECM: ``z / sqrt(mean(z^2) + eps)``, mean per sample over channels and positions."""
    dims = tuple(range(1, z.ndim))
    wide = z.to(torch.promote_types(z.dtype, torch.float32))  # z**2 overflows half precision past 256
    return z * torch.rsqrt(wide.pow(2).mean(dim=dims, keepdim=True) + eps).to(z.dtype)
