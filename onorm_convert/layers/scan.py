"""Linear recurrences over the batch dimension, without a Python loop over samples.

Every Online Normalization state update has the form ``s_t = a_t * s_{t-1} + b_t`` on
``(N, C)`` per-sample statistics. Two evaluations, both free of division by running
products (which underflow for long streams or small alphas):

- constant decay ``a``: one matrix product with the ``(N+1, N)`` matrix of powers
  ``a**(t-1-j)`` (cached), for ``N <= MATRIX_MAX_STEPS``;
- otherwise a Hillis-Steele scan of ``(decay, increment)`` pairs in ``log2(N)`` steps,
  combining ``(a2, b2) . (a1, b1) = (a2 * a1, a2 * b1 + b2)``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

MATRIX_MAX_STEPS = 256  # past this the O(N^2 C) product costs more than log2(N) elementwise steps


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
    if not isinstance(decay, Tensor) and steps <= MATRIX_MAX_STEPS:
        weights, powers = _power_matrix(float(decay), steps, increment.dtype, increment.device)
        states = torch.addmm(powers * initial, weights, increment)  # rows s_0 .. s_N
        return states[:-1], states[-1]
    return _pair_scan(decay, increment, initial)


@functools.lru_cache(maxsize=64)
def _power_matrix(decay: float, steps: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``W[t, j] = decay**(t-1-j)`` for ``j < t`` else 0, shape ``(steps+1, steps)``; and ``decay**t`` as a column."""
    t = torch.arange(steps + 1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(steps, dtype=torch.float64).unsqueeze(0)
    exponent = t - 1 - j
    weights = torch.where(exponent >= 0, decay ** exponent.clamp(min=0), 0.0)
    powers = decay ** t
    return weights.to(dtype=dtype, device=device), powers.to(dtype=dtype, device=device)


def _pair_scan(decay: Tensor | float, increment: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """Hillis-Steele inclusive scan; see :func:`linear_scan`."""
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
