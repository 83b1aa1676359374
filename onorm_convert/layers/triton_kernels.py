"""The training passes as Triton kernels: CUDA tensors, or CPU tensors under Triton's interpreter.

The contract of :func:`.functional.scan_forward` / :func:`.functional.scan_backward` and of
:mod:`.native`: ``(N, C, S)`` activations, the state before the batch in, the state after it
out, and backward recomputing the forward's per-sample statistics from ``x3`` and that state
instead of keeping them. The kernels take every tensor's strides, so contiguous,
channels_last and other strided views are read and written in place, never copied.

A GPU wants thousands of independent programs; the samples of a batch are a stream. So each
pass over the activations is a parallel kernel over (sample, block of channels), and the
recurrences are a small kernel whose programs each own a block of channels and walk the
samples t = 0..N-1 in order (a sequential scan, as the native kernels and the per-sample
reference run it: the same operations in the same order, any N). Activations with positions
(S > 1), forward:

1. ``_moments_kernel``: each sample's per-channel mean and biased variance. BLOCK_S positions
   at a time, each step centered on its own mean in registers (exact two-pass centering,
   one read of memory), the steps merged by Chan et al.'s pairwise update.
2. ``_forward_scan_kernel``: the forward recurrences; per (sample, channel) the affine map
   before the clamp, ``z = (x - center) * scale + beta`` with ``center = mu_prev`` (the mean
   carried as its drift from ``mean0``, as :func:`.functional.forward_statistics` explains,
   then added back once: data at an undrifted stream mean gives exactly ``y = 0``) and
   ``scale = gamma / k``.
3. ``_normalize_kernel``: ``z``, clamped.

Backward runs 1 and 2 again (the same kernels on the same data give the same bits, so the
same clamp mask), then ``_grad_sums_kernel`` (per (sample, channel) the sums of ``gz`` and
``gz * (x - mu_prev)``, ``gz`` the gradient where the clamp let it through),
``_backward_scan_kernel`` (v, u, the parameter gradients and the input gradient's
coefficients, as :func:`.functional.backward_statistics`) and ``_input_grad_kernel``.
Dense activations (S == 1) need no moments: one kernel each way walks the stream per channel
block, as the native dense kernel does. The walks are the only sequential part: N dependent
steps per program, whose cost grows with the batch, not with the activations' size
(``benchmarks/gpu_check.sh`` measures it against cuDNN's BatchNorm).

Precision: activations are loaded in their own dtype (bf16/fp16 too: no upcast copy) and
computed on in the statistics dtype, ``mean0``'s (float32, or float64), in which the passes
also accumulate their sums (tree reductions within a tile) and keep the per-sample
coefficients; never in half precision. The recurrences' state is float64 whatever that dtype,
as in the native kernels: it is O(N * C) work, and a float32 drift from a distant ``mean0``
would lose the precision that the per-sample loop keeps. Divisions and square roots are
correctly rounded (Triton's default float32 ``/`` and ``sqrt`` are approximate on NVIDIA
GPUs), no multiply-add is fused (so the compiled kernels round as the interpreter does, and
forward and backward form ``z`` alike), and the scalar settings are passed as float64 and
rounded inside to the dtype each is used in (a plain Python float argument would arrive as
float32).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .functional import batch_projection, project_within_batch

# The @triton.jit decorators below read TRITON_INTERPRET once, now: interpreted kernels run CPU tensors.
INTERPRETED = bool(triton.knobs.runtime.interpret)
TILE = 4096  # activations per program and step of a pass (a [BLOCK_C, BLOCK_S] tile)
POSITIONS_BLOCK = 1024  # the most positions per step where positions are innermost in memory
CHANNELS_BLOCK = 64  # the most channels per step where channels are innermost (channels_last)
SCAN_BLOCK = 128  # channels per program of the scans (their work is O(N * C): they need few)
# No fused multiply-adds: the compiled kernels round as the interpreter (numpy), the scans and the native
# kernels (-ffp-contract=off) do, and forward and backward form z alike whatever code surrounds it.
LAUNCH = {"enable_fp_fusion": False}


def forward(x3, mean0, var0, gamma, offset, alpha_fwd: float, eps: float, limit: float):
    """Training forward of activations ``x3`` (``(N, C, S)``): ``(z, mean_last, var_last)``.

    ``z`` is shaped as ``x3``, in its dtype and (where that is dense) its layout; the new
    state is in ``mean0``'s dtype, the statistics dtype. The contract of
    :func:`.functional.scan_forward`.
    """
    n, channels, positions = x3.shape
    mean0, var0, gamma, offset = _per_channel(x3, mean0, var0, gamma, offset)
    z = torch.empty_like(x3)
    mean_last, var_last = torch.empty_like(mean0), torch.empty_like(var0)
    if positions == 1:
        _dense_forward_kernel[_scan_grid(channels)](
            x3, z, mean0, var0, gamma, offset, mean_last, var_last, n, channels, *x3.stride()[:2], *z.stride()[:2],
            alpha_fwd, eps, limit, BLOCK_C=SCAN_BLOCK, **LAUNCH,
        )  # fmt: skip
        return z, mean_last, var_last
    _, _, center, scale = _forward_statistics(x3, mean0, var0, gamma, alpha_fwd, eps, mean_last, var_last)
    block_c, block_s = _tile(x3)
    _normalize_kernel[_pass_grid(x3, block_c)](
        x3, z, center, scale, offset, channels, positions, *x3.stride(), *z.stride(), limit,
        BLOCK_C=block_c, BLOCK_S=block_s, **LAUNCH,
    )  # fmt: skip
    return z, mean_last, var_last


def backward(g3, x3, mean0, var0, gamma, offset, u0, v0, alpha_fwd, alpha_bkw, eps, limit, stable: bool = False,
             project: bool = False):  # fmt: skip
    """Training backward of ``(N, C, S)`` activations: ``(grad_x, grad_weight, grad_bias, u_last, v_last)``.

    ``grad_x`` as :func:`forward`'s ``z`` (``x3``'s dtype and layout; ``g3`` may have others),
    the rest in ``mean0``'s dtype. ``stable``: v advances by the implicit form of its
    recurrence (``control="stable"``). ``project``: ``projection="batch"``'s ``grad_x``
    (:func:`.functional.batch_projection`). The contract of
    :func:`.functional.scan_backward`.
    """
    n, channels, positions = x3.shape
    mean0, var0, gamma, offset, u0, v0 = _per_channel(x3, mean0, var0, gamma, offset, u0, v0)
    grad_x = torch.empty_like(x3)
    u_last, v_last, grad_weight, grad_bias = (torch.empty_like(mean0) for _ in range(4))
    settings = (alpha_fwd, alpha_bkw, eps)
    if positions == 1:
        _dense_backward_kernel[_scan_grid(channels)](
            g3, x3, grad_x, mean0, var0, gamma, offset, u0, v0, u_last, v_last, grad_weight, grad_bias, n, channels,
            *g3.stride()[:2], *x3.stride()[:2], *grad_x.stride()[:2], *settings, limit, STABLE=stable,
            BLOCK_C=SCAN_BLOCK, **LAUNCH,
        )  # fmt: skip
        if project:  # dense is small: the walk again without the controls (alpha_bkw 1), then the projection
            plain, unused = torch.empty_like(x3, dtype=mean0.dtype), [torch.empty_like(mean0) for _ in range(4)]
            _dense_backward_kernel[_scan_grid(channels)](
                g3, x3, plain, mean0, var0, gamma, offset, u0, v0, *unused, n, channels, *g3.stride()[:2],
                *x3.stride()[:2], *plain.stride()[:2], alpha_fwd, 1.0, eps, limit, STABLE=stable, BLOCK_C=SCAN_BLOCK,
                **LAUNCH,
            )  # fmt: skip
            grad_x.copy_(project_within_batch(plain, x3.to(mean0.dtype), eps))
        return grad_x, grad_weight, grad_bias, u_last, v_last
    state = torch.empty_like(mean0), torch.empty_like(var0)  # the forward's new state again, unused here
    mean, var, center, scale = _forward_statistics(x3, mean0, var0, gamma, alpha_fwd, eps, *state)
    block_c, block_s = _tile(x3)
    grid = _pass_grid(x3, block_c)
    sum_gz, sum_gz_xc = torch.empty_like(mean), torch.empty_like(mean)
    _grad_sums_kernel[grid](
        g3, x3, center, scale, offset, sum_gz, sum_gz_xc, channels, positions, *g3.stride(), *x3.stride(), limit,
        BLOCK_C=block_c, BLOCK_S=block_s, **LAUNCH,
    )  # fmt: skip
    xc_coef, const = torch.empty_like(mean), torch.empty_like(mean)
    _backward_scan_kernel[_scan_grid(channels)](
        mean, var, sum_gz, sum_gz_xc, mean0, var0, gamma, u0, v0, u_last, v_last, grad_weight, grad_bias, xc_coef,
        const, n, channels, positions, *settings, STABLE=stable, BLOCK_C=SCAN_BLOCK, **LAUNCH,
    )  # fmt: skip
    if project:  # (N, C) work: the fit from the per-sample sums and moments, in place of the controls
        xc_coef, const = (t.contiguous() for t in batch_projection(sum_gz, sum_gz_xc, scale, mean, var, center, eps,
                                                                    positions))  # fmt: skip
    _input_grad_kernel[grid](
        g3, x3, grad_x, center, scale, offset, xc_coef, const, channels, positions, *g3.stride(),
        *x3.stride(), *grad_x.stride(), limit, BLOCK_C=block_c, BLOCK_S=block_s, **LAUNCH,
    )  # fmt: skip
    return grad_x, grad_weight, grad_bias, u_last, v_last


def _forward_statistics(x3, mean0, var0, gamma, alpha_fwd, eps, mean_last, var_last):
    """Per (sample, channel) ``(mean, var, center, scale)`` of ``(N, C, S)`` activations, each ``(N, C)``;
    the state after the batch written into ``mean_last``, ``var_last``."""
    n, channels, positions = x3.shape
    mean, var = (torch.empty((n, channels), dtype=mean0.dtype, device=x3.device) for _ in range(2))
    block_c, block_s = _tile(x3)
    _moments_kernel[_pass_grid(x3, block_c)](
        x3, mean, var, channels, positions, *x3.stride(), BLOCK_C=block_c, BLOCK_S=block_s, **LAUNCH
    )  # fmt: skip
    center, scale = torch.empty_like(mean), torch.empty_like(mean)
    _forward_scan_kernel[_scan_grid(channels)](
        mean, var, mean0, var0, gamma, center, scale, mean_last, var_last, n, channels, alpha_fwd, eps,
        BLOCK_C=SCAN_BLOCK, **LAUNCH,
    )  # fmt: skip
    return mean, var, center, scale


def _tile(x3: Tensor) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)`` of the passes over ``x3``: whole rows of the innermost dimension, TILE values in all."""
    _, channels, positions = x3.shape
    if x3.stride(1) == 1 and x3.stride(2) != 1:  # channels_last: a sample's positions are rows of channels
        block_c = min(triton.next_power_of_2(channels), CHANNELS_BLOCK)
        return block_c, min(triton.next_power_of_2(positions), TILE // block_c)
    block_s = min(triton.next_power_of_2(positions), POSITIONS_BLOCK)
    return min(triton.next_power_of_2(channels), TILE // block_s), block_s


def _pass_grid(x3: Tensor, block_c: int) -> tuple[int, int]:
    """A pass's programs: one per sample (the first grid axis: CUDA limits the others to 65535) and channel block."""
    return x3.shape[0], triton.cdiv(x3.shape[1], block_c)


def _scan_grid(channels: int) -> tuple[int]:
    return (triton.cdiv(channels, SCAN_BLOCK),)


def _per_channel(x3: Tensor, *vectors: Tensor) -> list[Tensor]:
    """``vectors`` as contiguous ``(C,)`` tensors; a ValueError for another shape (a kernel would read past its end)."""
    channels = x3.shape[1]
    for vector in vectors:
        if vector.shape != (channels,):
            raise ValueError(f"per-channel tensor of shape {tuple(vector.shape)} for {channels} channels")
    return [vector.contiguous() for vector in vectors]


# ---- Arithmetic shared by the kernels ------------------------------------------------------------


@triton.jit
def _div(x, y):
    """``x / y`` correctly rounded (float32's ``/`` is not, on NVIDIA GPUs; float64's is)."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    return x / y


@triton.jit
def _clamp(z, limit):
    """``z`` clamped to ``[-limit, limit]``; NaN stays NaN, as ``torch.clamp`` (``tl.clamp`` may drop it)."""
    return tl.where(z > limit, limit, tl.where(z < -limit, -limit, z))


@triton.jit
def _forward_step(mean, var_s, m0, drift, var, a, b, ab, eps):
    """One sample of the forward recurrences in float64: ``(d, 1/k, drift, var)``, the last two after the sample.

    ``d = m - mu_prev`` with ``mu_prev = m0 + drift``; ``var = a var + (1-a) s + a (1-a) d^2``.
    """
    d = (mean - m0) - drift
    return d, 1.0 / tl.sqrt(var + eps), drift + b * d, a * var + b * var_s + ab * (d * d)  # float64: both IEEE


@triton.jit
def _next_v(v_prev, mean_gy, cb_mean_y2, STABLE: tl.constexpr):
    """v after a sample from ``mean(g y)`` and ``(1-ab) mean(y^2)``: the doc's step, or (STABLE) its implicit form."""
    if STABLE:
        return _div(v_prev + mean_gy, 1.0 + cb_mean_y2)
    return v_prev * (1.0 - cb_mean_y2) + mean_gy


@triton.jit
def _splat(value, dtype: tl.constexpr):
    """A float64 kernel argument (a Python float under the interpreter) as a ``dtype`` scalar."""
    return tl.full([], value, dtype)


@triton.jit
def _pass_block(C, BLOCK_C: tl.constexpr):
    """A pass program's sample ``n`` and block of channels ``cols`` (its grid: samples x channel blocks), which of
    them exist, and ``at``: where the sample's per-(sample, channel) values of those channels are."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, cols, cols < C, n.to(tl.int64) * C + cols


@triton.jit
def _tile_offsets(n, cols, s0, S, stride_n, stride_c, stride_s, BLOCK_S: tl.constexpr):
    """Offsets (int64: large activations) and mask of a ``[BLOCK_C, BLOCK_S]`` tile: sample ``n``, channels
    ``cols``, positions from ``s0``; ``cols`` already masked by the caller's channel count."""
    pos = s0 + tl.arange(0, BLOCK_S)
    offsets = n.to(tl.int64) * stride_n + cols[:, None].to(tl.int64) * stride_c + pos[None, :].to(tl.int64) * stride_s
    return offsets, pos < S


# ---- The passes over the activations ------------------------------------------------------------


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, var_ptr, C, S, stride_n, stride_c, stride_s,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """``mean[n, c]``, ``var[n, c]``: mean and biased variance of ``x[n, c, :]`` in ``mean_ptr``'s dtype.

    Each step's BLOCK_S positions are centered on their own mean (exact centering, in
    registers), and merged into the running ``(count, mean, sum of squared deviations)`` by
    Chan et al.'s update; with S <= BLOCK_S this is exactly the two-pass formula.
    """
    dtype = mean_ptr.dtype.element_ty
    n, cols, channel_in, _ = _pass_block(C, BLOCK_C)
    count = tl.zeros([BLOCK_C], dtype)
    mean = tl.zeros([BLOCK_C], dtype)
    squares = tl.zeros([BLOCK_C], dtype)
    for s0 in range(0, S, BLOCK_S):
        offsets, pos_in = _tile_offsets(n, cols, s0, S, stride_n, stride_c, stride_s, BLOCK_S)
        inside = channel_in[:, None] & pos_in[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(dtype)
        step = tl.sum(pos_in.to(dtype), axis=0)
        step_mean = _div(tl.sum(x, axis=1), step)
        deviation = tl.where(inside, x - step_mean[:, None], 0.0)
        total = count + step
        delta = step_mean - mean
        mean = mean + delta * _div(step, total)
        squares = squares + tl.sum(deviation * deviation, axis=1) + delta * delta * _div(count * step, total)
        count = total
    at = n.to(tl.int64) * C + cols
    tl.store(mean_ptr + at, mean, mask=channel_in)
    tl.store(var_ptr + at, _div(squares, count), mask=channel_in)


@triton.jit
def _z_before_clamp(x, center, scale, offset, dtype: tl.constexpr):
    """``(xc, z)``: ``xc = x - mu_prev`` and ``z = xc * scale + beta`` in ``dtype``; the forward and both backward
    passes compute them by this one function, so that they agree on the clamp mask to the bit."""
    xc = x.to(dtype) - center
    return xc, xc * scale + offset


@triton.jit
def _z_coefficients(center_ptr, scale_ptr, offset_ptr, at, cols, channel_in):
    """:func:`_z_before_clamp`'s ``(center, scale, offset)`` for channels ``cols`` as ``[BLOCK_C, 1]`` columns;
    ``at``: where one sample's per-(sample, channel) values of those channels are."""
    center = tl.load(center_ptr + at, mask=channel_in)[:, None]
    scale = tl.load(scale_ptr + at, mask=channel_in)[:, None]
    offset = tl.load(offset_ptr + cols, mask=channel_in)[:, None]
    return center, scale, offset


@triton.jit
def _through_clamp(g, z, limit):
    """``gz``: the gradient ``g`` where the clamp let ``z`` through, else 0 (also where ``z`` is NaN, as the
    scans' ``abs(z) <= limit``)."""
    return tl.where(tl.abs(z) <= limit, g, 0.0)


@triton.jit
def _normalize_kernel(x_ptr, z_ptr, center_ptr, scale_ptr, offset_ptr, C, S, sxn, sxc, sxs, szn, szc, szs,
                      limit: tl.float64, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """``z = clamp((x - center) * scale + beta)``, stored in ``z_ptr``'s dtype."""
    dtype = center_ptr.dtype.element_ty
    n, cols, channel_in, at = _pass_block(C, BLOCK_C)
    center, scale, offset = _z_coefficients(center_ptr, scale_ptr, offset_ptr, at, cols, channel_in)
    lim = _splat(limit, dtype)
    for s0 in range(0, S, BLOCK_S):
        x_at, pos_in = _tile_offsets(n, cols, s0, S, sxn, sxc, sxs, BLOCK_S)
        z_at, _ = _tile_offsets(n, cols, s0, S, szn, szc, szs, BLOCK_S)
        inside = channel_in[:, None] & pos_in[None, :]
        _, z = _z_before_clamp(tl.load(x_ptr + x_at, mask=inside), center, scale, offset, dtype)
        tl.store(z_ptr + z_at, _clamp(z, lim).to(z_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_sums_kernel(g_ptr, x_ptr, center_ptr, scale_ptr, offset_ptr, sum_gz_ptr, sum_gz_xc_ptr, C, S,
                      sgn, sgc, sgs, sxn, sxc, sxs, limit: tl.float64,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Per (sample, channel) ``sum(gz)`` and ``sum(gz * (x - mu_prev))``; ``gz`` is the gradient zeroed where the
    clamp cut (a NaN there too, as ``torch.clamp``'s backward)."""
    dtype = center_ptr.dtype.element_ty
    n, cols, channel_in, at = _pass_block(C, BLOCK_C)
    center, scale, offset = _z_coefficients(center_ptr, scale_ptr, offset_ptr, at, cols, channel_in)
    lim = _splat(limit, dtype)
    sum_gz = tl.zeros([BLOCK_C], dtype)
    sum_gz_xc = tl.zeros([BLOCK_C], dtype)
    for s0 in range(0, S, BLOCK_S):
        x_at, pos_in = _tile_offsets(n, cols, s0, S, sxn, sxc, sxs, BLOCK_S)
        g_at, _ = _tile_offsets(n, cols, s0, S, sgn, sgc, sgs, BLOCK_S)
        inside = channel_in[:, None] & pos_in[None, :]
        xc, z = _z_before_clamp(tl.load(x_ptr + x_at, mask=inside), center, scale, offset, dtype)
        g = tl.load(g_ptr + g_at, mask=inside, other=0.0).to(dtype)
        gz = _through_clamp(g, z, lim)
        sum_gz = sum_gz + tl.sum(gz, axis=1)
        sum_gz_xc = sum_gz_xc + tl.sum(gz * xc, axis=1)
    tl.store(sum_gz_ptr + at, sum_gz, mask=channel_in)
    tl.store(sum_gz_xc_ptr + at, sum_gz_xc, mask=channel_in)


@triton.jit
def _input_grad_kernel(g_ptr, x_ptr, dx_ptr, center_ptr, scale_ptr, offset_ptr, xc_coef_ptr, const_ptr, C, S,
                       sgn, sgc, sgs, sxn, sxc, sxs, sdn, sdc, sds, limit: tl.float64,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """``dL/dx = gz * gamma / k + (x - mu_prev) * xc_coef + const`` (``gamma / k`` is ``scale``), ``gz`` as in
    ``_grad_sums_kernel``."""
    dtype = center_ptr.dtype.element_ty
    n, cols, channel_in, at = _pass_block(C, BLOCK_C)
    center, scale, offset = _z_coefficients(center_ptr, scale_ptr, offset_ptr, at, cols, channel_in)
    xc_coef = tl.load(xc_coef_ptr + at, mask=channel_in)[:, None]
    const = tl.load(const_ptr + at, mask=channel_in)[:, None]
    lim = _splat(limit, dtype)
    for s0 in range(0, S, BLOCK_S):
        x_at, pos_in = _tile_offsets(n, cols, s0, S, sxn, sxc, sxs, BLOCK_S)
        g_at, _ = _tile_offsets(n, cols, s0, S, sgn, sgc, sgs, BLOCK_S)
        dx_at, _ = _tile_offsets(n, cols, s0, S, sdn, sdc, sds, BLOCK_S)
        inside = channel_in[:, None] & pos_in[None, :]
        xc, z = _z_before_clamp(tl.load(x_ptr + x_at, mask=inside), center, scale, offset, dtype)
        gz = _through_clamp(tl.load(g_ptr + g_at, mask=inside).to(dtype), z, lim)
        dx = gz * scale + xc * xc_coef + const
        tl.store(dx_ptr + dx_at, dx.to(dx_ptr.dtype.element_ty), mask=inside)


# ---- The recurrences: a program per block of channels walks the stream --------------------------
# Their state is float64 whatever the statistics dtype, as in the native kernels: it is O(N * C) work, and a
# float32 drift from a distant mean0 would lose what the per-sample loop keeps (the mean, 1e-3, from a stream
# at 1: test_triton's test_a_stream_far_from_its_starting_mean_loses_no_precision). Per-sample coefficients
# are rounded once to the statistics dtype, for the passes.


@triton.jit
def _state(ptr, at, mask):
    """Values at ``ptr + at`` as float64."""
    return tl.load(ptr + at, mask=mask).to(tl.float64)


@triton.jit
def _store(ptr, at, value, mask):
    """``value`` stored at ``ptr + at`` in ``ptr``'s dtype."""
    tl.store(ptr + at, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_constants(alpha_fwd, eps):
    """``(a, 1 - a, a (1 - a), eps)`` as float64 scalars."""
    f64: tl.constexpr = tl.float64
    return (
        _splat(alpha_fwd, f64),
        _splat(1 - alpha_fwd, f64),
        _splat(alpha_fwd * (1 - alpha_fwd), f64),
        _splat(eps, f64),
    )


@triton.jit
def _forward_scan_kernel(mean_ptr, var_ptr, mean0_ptr, var0_ptr, gamma_ptr, center_ptr, scale_ptr, mean_last_ptr,
                         var_last_ptr, N, C, alpha_fwd: tl.float64, eps: tl.float64, BLOCK_C: tl.constexpr):  # fmt: skip
    """The forward recurrences over the samples' ``(N, C)`` moments: per sample ``center = mu_prev`` and
    ``scale = gamma / k``; the state after the batch."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_in = cols < C
    m0 = _state(mean0_ptr, cols, channel_in)
    var = _state(var0_ptr, cols, channel_in)
    gamma = _state(gamma_ptr, cols, channel_in)
    a, b, ab, e = _forward_constants(alpha_fwd, eps)
    drift = tl.zeros([BLOCK_C], tl.float64)
    for t in range(N):
        at = t * C + cols
        mean, var_s = _state(mean_ptr, at, channel_in), _state(var_ptr, at, channel_in)
        _, inv_k, drift_next, var_next = _forward_step(mean, var_s, m0, drift, var, a, b, ab, e)
        _store(center_ptr, at, m0 + drift, channel_in)
        _store(scale_ptr, at, inv_k * gamma, channel_in)
        drift, var = drift_next, var_next
    _store(mean_last_ptr, cols, m0 + drift, channel_in)
    _store(var_last_ptr, cols, var, channel_in)


@triton.jit
def _backward_scan_kernel(mean_ptr, var_ptr, sum_gz_ptr, sum_gz_xc_ptr, mean0_ptr, var0_ptr, gamma_ptr, u0_ptr, v0_ptr,
                          u_last_ptr, v_last_ptr, grad_weight_ptr, grad_bias_ptr, xc_coef_ptr, const_ptr, N, C, S,
                          alpha_fwd: tl.float64, alpha_bkw: tl.float64, eps: tl.float64, STABLE: tl.constexpr,
                          BLOCK_C: tl.constexpr):  # fmt: skip
    """The backward recurrences of :func:`.functional.backward_statistics`, from the samples' moments and sums.

    The forward recurrences are walked again beside them for ``d`` and ``1/k``. Per sample:
    ``xc_coef = -(1-ab) v_prev / k^2`` and ``const = -(1-ab) u_prev``; after the batch u, v and
    the parameter gradients.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_in = cols < C
    m0 = _state(mean0_ptr, cols, channel_in)
    var = _state(var0_ptr, cols, channel_in)
    gamma = _state(gamma_ptr, cols, channel_in)
    u, v = _state(u0_ptr, cols, channel_in), _state(v0_ptr, cols, channel_in)
    a, b, ab, e = _forward_constants(alpha_fwd, eps)
    keep, cb, count = _splat(alpha_bkw, tl.float64), _splat(1 - alpha_bkw, tl.float64), _splat(S, tl.float64)
    drift = tl.zeros([BLOCK_C], tl.float64)
    grad_weight = tl.zeros([BLOCK_C], tl.float64)
    grad_bias = tl.zeros([BLOCK_C], tl.float64)
    for t in range(N):
        at = t * C + cols
        var_s = _state(var_ptr, at, channel_in)
        sum_gz, sum_gz_xc = _state(sum_gz_ptr, at, channel_in), _state(sum_gz_xc_ptr, at, channel_in)
        d, inv_k, drift, var = _forward_step(_state(mean_ptr, at, channel_in), var_s, m0, drift, var, a, b, ab, e)
        mean_gz_y = sum_gz_xc * inv_k / count  # the mean over positions of gz * y
        mean_y2 = (var_s + d * d) * inv_k * inv_k
        _store(xc_coef_ptr, at, -cb * v * inv_k * inv_k, channel_in)
        _store(const_ptr, at, -cb * u, channel_in)
        u = keep * u + (sum_gz * gamma / count - cb * v * d * inv_k) * inv_k
        v = _next_v(v, mean_gz_y * gamma, cb * mean_y2, STABLE)
        grad_weight = grad_weight + sum_gz_xc * inv_k
        grad_bias = grad_bias + sum_gz
    _store(u_last_ptr, cols, u, channel_in)
    _store(v_last_ptr, cols, v, channel_in)
    _store(grad_weight_ptr, cols, grad_weight, channel_in)
    _store(grad_bias_ptr, cols, grad_bias, channel_in)


# ---- Dense activations (S == 1): the whole pass in the walk over the stream ---------------------
# As the native dense kernel: float64 throughout, z and dL/dx rounded to the statistics dtype (z before the
# clamp, in forward and in backward's mask alike), then to the activations'.


@triton.jit
def _dense_z(y, gamma, offset, dtype: tl.constexpr):
    """``gamma * y + beta`` rounded to ``dtype``: the value forward clamps and backward's mask tests."""
    return (y * gamma + offset).to(dtype)


@triton.jit
def _dense_forward_kernel(x_ptr, z_ptr, mean0_ptr, var0_ptr, gamma_ptr, offset_ptr, mean_last_ptr, var_last_ptr, N, C,
                          sxn, sxc, szn, szc, alpha_fwd: tl.float64, eps: tl.float64, limit: tl.float64,
                          BLOCK_C: tl.constexpr):  # fmt: skip
    """Dense forward: per sample ``y = ((x - m0) - drift) / k``, ``z = clamp(gamma * y + beta)``; the new state."""
    dtype = mean0_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_in = cols < C
    m0 = _state(mean0_ptr, cols, channel_in)
    var = _state(var0_ptr, cols, channel_in)
    gamma = _state(gamma_ptr, cols, channel_in)
    offset = _state(offset_ptr, cols, channel_in)
    a, b, ab, e = _forward_constants(alpha_fwd, eps)
    lim = _splat(limit, dtype)
    drift = tl.zeros([BLOCK_C], tl.float64)
    for t in range(N):
        x = _state(x_ptr, t * sxn + cols * sxc, channel_in)
        d, inv_k, drift, var = _forward_step(x, 0.0, m0, drift, var, a, b, ab, e)
        _store(z_ptr, t * szn + cols * szc, _clamp(_dense_z(d * inv_k, gamma, offset, dtype), lim), channel_in)
    _store(mean_last_ptr, cols, m0 + drift, channel_in)
    _store(var_last_ptr, cols, var, channel_in)


@triton.jit
def _dense_backward_kernel(g_ptr, x_ptr, dx_ptr, mean0_ptr, var0_ptr, gamma_ptr, offset_ptr, u0_ptr, v0_ptr,
                           u_last_ptr, v_last_ptr, grad_weight_ptr, grad_bias_ptr, N, C, sgn, sgc, sxn, sxc, sdn, sdc,
                           alpha_fwd: tl.float64, alpha_bkw: tl.float64, eps: tl.float64, limit: tl.float64,
                           STABLE: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Dense backward: the forward walked again for ``y`` and ``k``, and per sample the doc's control,
    ``g' = gz gamma - (1-ab) v_prev y``, ``dL/dx = g' / k - (1-ab) u_prev``, ``u = u_prev + dL/dx``."""
    dtype = mean0_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_in = cols < C
    m0 = _state(mean0_ptr, cols, channel_in)
    var = _state(var0_ptr, cols, channel_in)
    gamma = _state(gamma_ptr, cols, channel_in)
    offset = _state(offset_ptr, cols, channel_in)
    u, v = _state(u0_ptr, cols, channel_in), _state(v0_ptr, cols, channel_in)
    a, b, ab, e = _forward_constants(alpha_fwd, eps)
    cb, lim = _splat(1 - alpha_bkw, tl.float64), _splat(limit, dtype)
    drift = tl.zeros([BLOCK_C], tl.float64)
    grad_weight = tl.zeros([BLOCK_C], tl.float64)
    grad_bias = tl.zeros([BLOCK_C], tl.float64)
    for t in range(N):
        x = _state(x_ptr, t * sxn + cols * sxc, channel_in)
        g = _state(g_ptr, t * sgn + cols * sgc, channel_in)
        d, inv_k, drift, var = _forward_step(x, 0.0, m0, drift, var, a, b, ab, e)
        y = d * inv_k
        gz = _through_clamp(g, _dense_z(y, gamma, offset, dtype), lim)  # none where forward's clamp cut
        grad_weight = grad_weight + gz * y
        grad_bias = grad_bias + gz
        dx = (gz * gamma - cb * v * y) * inv_k - cb * u
        v = _next_v(v, gz * gamma * y, cb * (y * y), STABLE)
        u = u + dx
        _store(dx_ptr, t * sdn + cols * sdc, dx.to(dtype), channel_in)  # rounded as native.cpp, then ops, round it
    _store(u_last_ptr, cols, u, channel_in)
    _store(v_last_ptr, cols, v, channel_in)
    _store(grad_weight_ptr, cols, grad_weight, channel_in)
    _store(grad_bias_ptr, cols, grad_bias, channel_in)
