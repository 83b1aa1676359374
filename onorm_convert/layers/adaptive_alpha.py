"""``alpha_mode="adaptive"``: each layer's alpha_fwd chosen from the drift its statistics see.

A converted model trains on with its user's recipe, and how fast the weights before a layer
move depends on that recipe: a fixed memory lags a fast SGD recipe's weights and only adds
noise to a slow AdamW one's (docs/finetune.md). So an adaptive layer keeps its alpha_fwd as
state and, after each training call, moves it by the rule below. Within a call alpha_fwd is
constant, so every call is the doc's equations at the alpha it used; only the choice of alpha
between calls departs from them.

The rule. ``shift = (mean_new - mean_old) / sqrt(var_old + eps)`` per channel is where the
call moved the streaming mean, in units of the spread; ``rho = cos(shift, last_shift)``
compares it with the previous call's (0 while either is zero). Statistics that lag a drift
keep moving the same way from call to call (rho > 0): their memory shortens. Statistics that
have caught up only follow the samples' noise, which has no direction (rho about 0, negative
when they overshoot): their memory lengthens. Then
``log(1 - alpha) += RATE * batch * rho``, clipped to ``BOUNDS`` (a layer starts at its
``alpha_fwd``, which may lie outside them, and the first call brings it inside). The rate is per sample, as
the doc's alphas are: at batch 1 a call moves alpha 32 times less than at batch 32.

Only the mean's movement is used: with one sample per call the variance's update has a sign
of its own (a single sample's squared deviation is mostly below its mean), which a cosine
would read as drift. All of it is tensor arithmetic on per-channel state: no host sync, and
``torch.compile`` traces it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FIXED, ADAPTIVE = "fixed", "adaptive"
ALPHA_MODES = (FIXED, ADAPTIVE)
RATE = 0.2 / 32  # per sample; measured with benchmarks/adaptive_alpha_probe.py
# alpha_fwd's range: memories of 100 to 1000 samples. Faster statistics (0.95) followed the drift of
# a fast recipe no better at batch 32 and trained worse at batch 1, where every sample moves the
# weights and a memory of 20 samples is mostly noise (docs/finetune.md).
BOUNDS = (0.99, 0.999)
_LOG_K_RANGE = (math.log(1 - BOUNDS[1]), math.log(1 - BOUNDS[0]))


def adapted_alpha(
    alpha: Tensor, last_shift: Tensor, mean_old: Tensor, var_old: Tensor, mean_new: Tensor, eps: float, batch: int
) -> tuple[Tensor, Tensor]:
    """``(alpha_next, shift)``: alpha_fwd for the next call, and this call's shift (the next ``last_shift``).

    ``alpha`` is the 0-dim alpha_fwd this call used; ``mean_old``, ``var_old`` the streaming
    statistics before it, ``mean_new`` after it; ``batch`` its number of samples.
    """
    shift = (mean_new - mean_old) * torch.rsqrt(var_old + eps)
    norms = shift.norm() * last_shift.norm()
    rho = torch.where(norms > 0, (shift * last_shift).sum() / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
    log_k = (torch.log1p(-alpha) + RATE * batch * rho).clamp(*_LOG_K_RANGE)
    return -torch.expm1(log_k), shift
