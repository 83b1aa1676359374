"""The scans' passes over the activations.

On the scan path, training ON reads the activations twice forward (statistics, then
output) and backward recomputes those statistics, then takes two sums and the input
gradient. The four functions below are those passes, as eager ops; the native kernels of
:mod:`.native` need none of them.

All take activations viewed as ``(N, C, S)`` and per-sample-per-channel coefficients
shaped ``(N, C, 1)``. The clamp mask is recomputed from ``x`` in backward rather than
stored: it costs arithmetic, not memory traffic, and survives an in-place ReLU on the output.
"""

from __future__ import annotations

import torch
from torch import Tensor


def spatial_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel ``(mean, biased variance)`` over the last dim of ``x``.

    Two passes over each row (mean, then squared deviations): exact centering.
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
