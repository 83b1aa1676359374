"""The Online Normalization computation: training (streaming) and eval (frozen).

The equations are those of ``shared/docs/online-norm.md``. Training mode treats the
samples of a batch as a stream in index order. Every per-sample recurrence is linear
in its state, so each is evaluated for the whole batch by :func:`linear_scan` on the
``(N, C)`` per-sample statistics; the activations themselves are read in two passes
forward and two backward, as BatchNorm does (see :mod:`.kernels`).

Notation (per sample ``t`` and channel): ``m``/``s`` are the spatial mean and biased
variance of ``x``, ``mu_prev``/``var_prev`` the streaming statistics before the sample,
``k = sqrt(var_prev + eps)``, ``y = (x - mu_prev) / k``, ``z = gamma * y + beta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import kernel
from .scan import linear_scan

CLAMP, LAYER_SCALING, NONE = "clamp", "layer_scaling", "none"
ECMS = (CLAMP, LAYER_SCALING, NONE)


@dataclass
class StreamState:
    """The four per-channel state buffers of a layer, updated in place."""

    mean: Tensor  # mu
    var: Tensor  # var
    u: Tensor  # backward control for the component along the constant vector
    v: Tensor  # backward control for the component along y


def stat_dtype(x: Tensor, state: Tensor) -> torch.dtype:
    """float64 if the input or the state is float64, else float32 (never half precision)."""
    return torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32


class OnlineNormFunction(torch.autograd.Function):
    """Streaming normalization + affine + optional clamp, with ON's controlled backward.

    ``forward(x, weight, bias, state, alpha_fwd, alpha_bkw, eps, clamp_value)`` returns
    ``z = gamma * y + beta``, clamped to ``[-clamp_value, clamp_value]`` unless
    ``clamp_value`` is None. ``weight``/``bias`` may be None (no affine). ``state`` is
    advanced in place: mean/var in forward, u/v in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, state: StreamState, alpha_fwd, alpha_bkw, eps, clamp_value):
        dtype = stat_dtype(x, state.mean)
        x3 = _as_channels_by_positions(x, dtype)
        m, s = kernel("spatial_stats", x3)(x3)

        mean_prev, mean_last = linear_scan(alpha_fwd, (1 - alpha_fwd) * m, state.mean.to(dtype))
        d = m - mean_prev
        var_incr = (1 - alpha_fwd) * s + (alpha_fwd * (1 - alpha_fwd)) * d * d
        var_prev, var_last = linear_scan(alpha_fwd, var_incr, state.var.to(dtype))
        state.mean.copy_(mean_last)
        state.var.copy_(var_last)

        inv_k = torch.rsqrt(var_prev + eps)
        gamma = None if weight is None else weight.to(dtype)
        scale = inv_k if gamma is None else inv_k * gamma
        shift = -mean_prev * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        limit = torch.tensor(math.inf if clamp_value is None else clamp_value, dtype=dtype, device=x.device)
        z = kernel("affine_clamp", x3)(x3, scale.unsqueeze(2), shift.unsqueeze(2), limit)

        ctx.save_for_backward(x, scale, shift, limit, mean_prev, inv_k, d, s, gamma)
        ctx.state, ctx.alpha_bkw = state, alpha_bkw
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # detach(): the same memory without the view relation autograd forbids for a Function's
        # output that a following ReLU(inplace=True) modifies.
        return z.reshape(x.shape).detach().to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, shift, limit, mean_prev, inv_k, d, s, gamma = ctx.saved_tensors
        state, ab = ctx.state, ctx.alpha_bkw
        dtype = mean_prev.dtype
        x3 = _as_channels_by_positions(x, dtype)
        g3 = grad_out.reshape(x3.shape)
        count = x3.shape[2]
        scale3, shift3 = scale.unsqueeze(2), shift.unsqueeze(2)
        sum_gz, sum_gz_x = kernel("masked_grad_sums", x3)(g3, x3, scale3, shift3, limit)
        # mean over positions of grad_z * y, from the two sums (y = (x - mean_prev) * inv_k).
        mean_gz_y = (sum_gz_x - mean_prev * sum_gz) * (inv_k / count)
        grad_weight = None if ctx.weight_dtype is None else (mean_gz_y.sum(0) * count).to(ctx.weight_dtype)
        grad_bias = None if ctx.bias_dtype is None else sum_gz.sum(0).to(ctx.bias_dtype)

        g_scale = inv_k if gamma is None else inv_k * gamma  # dL/dx = grad_z * g_scale + ...
        mean_g_y = mean_gz_y if gamma is None else mean_gz_y * gamma
        mean_y2 = (s + d * d) * inv_k * inv_k
        v_prev, v_last = linear_scan(1 - (1 - ab) * mean_y2, mean_g_y, state.v.to(dtype))
        mean_g = sum_gz / count if gamma is None else sum_gz * (gamma / count)
        mean_h = (mean_g - (1 - ab) * v_prev * d * inv_k) * inv_k
        u_prev, u_last = linear_scan(ab, mean_h, state.u.to(dtype))
        state.u.copy_(u_last)
        state.v.copy_(v_last)

        # dL/dx = g'/k - (1-ab) u_prev,  g' = g - (1-ab) v_prev y  ->  affine in grad_z and x.
        x_coef = -(1 - ab) * v_prev * inv_k * inv_k
        const = -x_coef * mean_prev - (1 - ab) * u_prev
        coefs = (g_scale.unsqueeze(2), x_coef.unsqueeze(2), const.unsqueeze(2))
        grad_x = kernel("input_grad", x3)(g3, x3, scale3, shift3, limit, *coefs)
        return grad_x.reshape(x.shape).to(x.dtype), grad_weight, grad_bias, None, None, None, None, None


def _as_channels_by_positions(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as ``(N, C, positions)`` in ``dtype``; a view whenever the layout allows (channels_last too)."""
    x = x if x.dtype == dtype else x.to(dtype)
    return x.reshape(x.shape[0], x.shape[1], -1)


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
    return z * torch.rsqrt(z.pow(2).mean(dim=dims, keepdim=True) + eps)
