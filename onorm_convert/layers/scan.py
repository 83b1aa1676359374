"""Linear recurrences over the batch dimension, without a Python loop over samples.

Every Online Normalization state update has the form ``s_t = a_t * s_{t-1} + b_t`` on
``(N, C)`` per-sample statistics. Such a recurrence is associative in its
``(decay, increment)`` pairs, ``(a2, b2) . (a1, b1) = (a2 * a1, a2 * b1 + b2)``, so:

- up to ``BLOCK`` steps it is evaluated directly: a constant decay ``a`` as one product
  with the matrix of powers ``a**(t-j)``, a per-step decay by a Hillis-Steele scan in
  ``log2(N)`` elementwise steps;
- longer streams are cut into blocks of ``BLOCK`` steps, scanned within each block
  (all blocks at once), the blocks' totals scanned in turn, and each block's states then
  offset by the state carried into it: ``O(N * BLOCK)`` work instead of ``O(N^2)`` or
  ``O(N log N)``.

Only products of decays are formed, never quotients, so decays whose running product
underflows to zero (long streams, small alphas) stay exact. A product that overflows
(per-step decays far below -1) multiplies a zero state or increment as exact arithmetic
does, to zero, not to ``inf * 0 = nan``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 16


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
    states = _inclusive_scan(decay, increment, initial)
    return torch.cat((initial.unsqueeze(0), states[:-1])), states[-1]


def _inclusive_scan(decay: Tensor | float, increment: Tensor, initial: Tensor) -> Tensor:
    """``s_1 .. s_N`` (see :func:`linear_scan`); ``increment`` may have any trailing shape."""
    steps = increment.shape[0]
    if steps <= BLOCK:
        local, decay_to = _local_scan(decay, increment)
        return local + _times(decay_to, initial)
    blocks = -(-steps // BLOCK)
    pad = blocks * BLOCK - steps  # identity steps (decay 1, increment 0) complete the last block
    increment = torch.nn.functional.pad(increment, (0,) * (2 * increment.dim() - 2) + (0, pad))
    if isinstance(decay, Tensor):
        decay = torch.nn.functional.pad(decay, (0,) * (2 * decay.dim() - 2) + (0, pad), value=1.0)
        decay = decay.reshape(blocks, BLOCK, *decay.shape[1:]).transpose(0, 1)
    # Steps within a block along dim 0, blocks along dim 1.
    local, decay_to = _local_scan(decay, increment.reshape(blocks, BLOCK, *increment.shape[1:]).transpose(0, 1))
    block_decay = decay_to[-1] if isinstance(decay, Tensor) else decay**BLOCK
    carried = _inclusive_scan(block_decay, local[-1], initial)  # state after each block
    carried_in = torch.cat((initial.unsqueeze(0), carried[:-1]))  # state before each block
    states = local + _times(decay_to, carried_in)
    return states.transpose(0, 1).reshape(blocks * BLOCK, *increment.shape[1:])[:steps]


def _local_scan(decay: Tensor | float, increment: Tensor) -> tuple[Tensor, Tensor]:
    """Scan along dim 0 from a zero state: ``(states, decay_to)``, ``states[t] = sum_j<=t decay(j..t] increment[j]``.

    ``decay_to[t]`` is the product of decays ``1..t`` (how much of the initial state remains),
    shaped to broadcast against ``states``.
    """
    steps = increment.shape[0]
    if not isinstance(decay, Tensor):  # |decay| <= 1: its powers cannot overflow
        weights, powers = _power_matrix(float(decay), steps, increment.dtype, increment.device)
        states = torch.einsum("tj,j...->t...", weights, increment)
        return states, powers.reshape((steps,) + (1,) * (increment.dim() - 1))
    acc_decay, acc_incr = decay, increment
    shift = 1
    while shift < steps:
        # Combine each step with the span `shift` before it; the first `shift` steps meet the
        # identity (decay 1, increment 0). Written as shifts, not slices + cat, so that a
        # compiled scan fuses each round into one loop.
        acc_incr = acc_incr + _times(acc_decay, _shifted(acc_incr, shift, 0.0))
        acc_decay = _times(acc_decay, _shifted(acc_decay, shift, 1.0))
        shift *= 2
    return acc_incr, acc_decay


def _times(a: Tensor, b: Tensor) -> Tensor:
    """``a * b``, exactly 0 where either is 0 even if the other overflowed to inf."""
    return torch.where((a == 0) | (b == 0), 0.0, a * b)


def _shifted(t: Tensor, shift: int, fill: float) -> Tensor:
    """``t`` moved ``shift`` places along dim 0, the first ``shift`` places filled with ``fill``."""
    return torch.nn.functional.pad(t[:-shift], (0,) * (2 * t.dim() - 2) + (shift, 0), value=fill)


@functools.lru_cache(maxsize=64)
def _power_matrix(decay: float, steps: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``W[t, j] = decay**(t-j)`` for ``j <= t`` else 0, shape ``(steps, steps)``; and ``decay**(t+1)``.

    Cached: one per layer setting and batch size. The scans run eagerly or inside the registered ops, never traced.
    """
    t = torch.arange(steps, dtype=torch.float64).unsqueeze(1)
    exponent = t - torch.arange(steps, dtype=torch.float64).unsqueeze(0)
    weights = torch.where(exponent >= 0, decay ** exponent.clamp(min=0), 0.0)
    powers = decay ** (torch.arange(steps, dtype=torch.float64) + 1)
    return weights.to(dtype=dtype, device=device), powers.to(dtype=dtype, device=device)
