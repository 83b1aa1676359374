"""Linear recurrences over the batch dimension, without a Python loop over samples.

Every Online Normalization state update has the form ``s_t = a_t * s_{t-1} + b_t``.
:func:`linear_scan` evaluates it for all ``t`` at once with a Hillis-Steele scan of
``(decay, increment)`` pairs, combining ``(a2, b2) . (a1, b1) = (a2 * a1, a2 * b1 + b2)``.
Only products of decays are formed, never quotients, so decays whose running product
underflows to zero (long streams, small alphas) stay exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_scan(decay: Tensor | float, increment: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """States of ``s_t = decay_t * s_{t-1} + increment_t`` along dim 0.

    Args:
        decay: ``(N, C)`` per-step decays, or one float used at every step.
        increment: ``(N, C)`` per-step increments.
        initial: ``(C,)`` the state before the first step, ``s_0``.

    Returns:
        ``(previous, last)``: ``previous[t]`` is the state *before* step ``t``
        (``s_0 .. s_{N-1}``), ``last`` is the state after the final step, ``s_N``.
    """
    steps = increment.shape[0]
    acc_decay = decay if isinstance(decay, Tensor) else None
    acc_incr = increment
    shift = 1
    while shift < steps:
        head, tail = acc_incr[:-shift], acc_incr[shift:]
        if acc_decay is None:
            # Constant decay: after combining spans of length `shift`, each span's decay is decay**shift.
            tail = torch.add(tail, head, alpha=decay**shift)
        else:
            tail = torch.addcmul(tail, acc_decay[shift:], head)
            acc_decay = torch.cat((acc_decay[:shift], acc_decay[shift:] * acc_decay[:-shift]))
        acc_incr = torch.cat((acc_incr[:shift], tail))
        shift *= 2
    if acc_decay is None:
        powers = decay ** torch.arange(1, steps + 1, dtype=increment.dtype, device=increment.device)
        states = torch.addcmul(acc_incr, powers.unsqueeze(1), initial)
    else:
        states = torch.addcmul(acc_incr, acc_decay, initial)
    previous = torch.cat((initial.unsqueeze(0), states[:-1]))
    return previous, states[-1]
