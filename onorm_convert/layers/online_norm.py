"""OnlineNorm1d/2d/3d: drop-in BatchNorm replacements with Online Normalization."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .adaptive_alpha import ADAPTIVE, ALPHA_MODES, adapted_alpha
from .functional import (
    CLAMP,
    CLAMP_MODES,
    CONTROLS,
    ECMS,
    EXACT,
    FIXED,
    LAYER_SCALING,
    NONE,
    PROJECTIONS,
    clamp_bound,
    clamp_limit,
    frozen_affine,
    layer_scale,
)  # fmt: skip
from .ops import train_step

STATE_BUFFERS = ("running_mean", "running_var", "u_ctrl", "v_ctrl")
# alpha_mode="adaptive" only: the alpha_fwd in use, and the last call's shift of the mean.
ADAPTIVE_BUFFERS = ("alpha_now", "last_shift")


def normalize_ecm(ecm: str | None) -> str:
    """Canonical ECM name: ``"clamp"``, ``"layer_scaling"`` or ``"none"`` (``None`` and ``"layer-scaling"`` accepted)."""
    name = NONE if ecm is None else str(ecm).lower().replace("-", "_")
    if name not in ECMS:
        raise ValueError(f"ecm must be one of {', '.join(ECMS)} (or None); got {ecm!r}")
    return name


class OnlineNormBase(nn.Module):
    """Online Normalization over channel dim 1 of inputs of rank ``_ranks``.

    Training mode normalizes each sample with the streaming statistics of the samples
    before it (batch order is stream order) and advances them; eval mode uses them
    frozen. Buffers: ``running_mean``/``running_var`` (streaming mu and var) and
    ``u_ctrl``/``v_ctrl`` (the backward control accumulators u and v), all kept in
    float32 (or float64) whatever the dtype the module is cast to.

    Four departures from the doc's equations, each off by default here:

    - ``control="stable"``: v advances by the implicit form of its recurrence,
      ``v = (v_prev + mean(g y)) / (1 + (1 - alpha_bkw) * mean(y^2))``, instead of
      ``v = v_prev + mean(g' y)`` (``"exact"``). Same fixed point; the decay stays in (0, 1]
      where the exact one falls below -1 once ``mean(y^2) > 2 / (1 - alpha_bkw)`` and v runs away.
    - ``clamp_mode="affine"``: the clamp bounds z by ``max over channels of |beta| + c * |gamma|``
      (``c = clamp_value``), the bound that ``|y| <= c`` implies for the loosest channel, recomputed
      from the parameters at each call (``clamp_bound``); ``"fixed"`` bounds z by ``c`` itself. A
      freshly initialized layer (gamma 1, beta 0) gets ``c`` either way.
    - ``alpha_mode="adaptive"``: alpha_fwd is state (buffer ``alpha_now``, starting at
      ``alpha_fwd``) that moves after each training call by the drift the statistics saw
      (:mod:`.adaptive_alpha`); each call is the doc's equations at the alpha it used.
    - ``projection="batch"``: in a batch of two samples or more, the input gradient is the one with
      the statistics held constant (``gz * gamma / k``, no controls), less per channel its
      components along the constant and along the centred input within the batch: what
      BatchNorm's exact gradient removes, and the controls remove only on average over the
      stream (:func:`.functional.batch_projection`). A batch of one sample gets the doc's
      gradient; the forward, the parameters' gradients and u, v are the doc's either way.

    A training step whose new state would be NaN/Inf (a bad input, or u/v running away until
    they overflow), raises :class:`OnlineNormStateError` naming the layer (``layer_name``,
    set by :func:`onorm_convert.convert` to the module's name) and leaves the state as it was.

    Args:
        num_features: C, the channels (dim 1) of the input.
        alpha_fwd: the decay of the streaming mean and variance per sample (the doc's a_f;
            memory about ``1 / (1 - alpha_fwd)`` samples), in [0, 1).
        alpha_bkw: the decay of the backward control processes u and v (a_b), in [0, 1).
        eps: added to the variance before its square root, as BatchNorm's eps.
        affine: learnable per-channel ``weight`` (gamma) and ``bias`` (beta).
        ecm: error compensation after the affine: ``"clamp"``, ``"layer_scaling"`` or
            ``"none"`` (None); ``"layer-scaling"`` is accepted.
        clamp_value: c, the clamp's bound (see ``clamp_mode``); positive.
        ls_eps: the epsilon of layer scaling, ``z / sqrt(mean(z^2) + ls_eps)``.
        control: ``"exact"`` (the doc's v step) or ``"stable"`` (above).
        clamp_mode: ``"fixed"`` (the doc's) or ``"affine"`` (above).
        alpha_mode: ``"fixed"`` (the doc's) or ``"adaptive"`` (above; ``alpha_fwd`` is then where it starts).
        projection: ``"none"`` (the doc's) or ``"batch"`` (above).
        device, dtype: of the parameters; the state is float32 (float64 for a float64 layer).
    """

    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str | None = CLAMP,
        clamp_value: float = 5.0,
        ls_eps: float = 1e-5,
        control: str = EXACT,
        clamp_mode: str = FIXED,
        alpha_mode: str = FIXED,
        projection: str = NONE,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive; got {num_features}")
        for name, alpha in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= alpha < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {alpha}")
        if clamp_value <= 0:
            raise ValueError(f"clamp_value must be positive; got {clamp_value}")
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {', '.join(CONTROLS)}; got {control!r}")
        if clamp_mode not in CLAMP_MODES:
            raise ValueError(f"clamp_mode must be one of {', '.join(CLAMP_MODES)}; got {clamp_mode!r}")
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {', '.join(ALPHA_MODES)}; got {alpha_mode!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}; got {projection!r}")
        self.num_features = num_features
        self.alpha_fwd = float(alpha_fwd)
        self.alpha_bkw = float(alpha_bkw)
        self.eps = float(eps)
        self.affine = affine
        self.ecm = normalize_ecm(ecm)
        self.clamp_value = float(clamp_value)  # c: the bound on z ("fixed") or on |y| ("affine"); see clamp_bound
        self.ls_eps = float(ls_eps)
        self.control = control
        self.clamp_mode = clamp_mode
        self.alpha_mode = alpha_mode
        self.projection = projection
        self.layer_name: str | None = None  # for error messages; convert() sets the module's qualified name
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in STATE_BUFFERS:
            self.register_buffer(name, torch.zeros(num_features, device=device, dtype=state_dtype))
        if alpha_mode == ADAPTIVE:
            self.register_buffer("alpha_now", torch.zeros((), device=device, dtype=state_dtype))
            self.register_buffer("last_shift", torch.zeros(num_features, device=device, dtype=state_dtype))
        self.reset_running_stats()

    @property
    def clamp_bound(self) -> float:
        """The bound the clamp puts on z now: ``clamp_value``, or with ``clamp_mode="affine"`` ``max(|beta| + clamp_value * |gamma|)``."""
        return clamp_limit(self.clamp_value, self.clamp_mode, self.weight, self.bias)

    def reset_running_stats(self) -> None:
        """Fresh stream: mu = 0, var = 1, u = v = 0 (and an adaptive alpha back at ``alpha_fwd``, no last shift)."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.u_ctrl.zero_()
            self.v_ctrl.zero_()
            if self.alpha_mode == ADAPTIVE:
                self.alpha_now.fill_(self.alpha_fwd)
                self.last_shift.zero_()

    def _apply(self, fn, recurse=True):
        # model.half()/bfloat16() must not degrade the streaming statistics.
        super()._apply(fn, recurse)
        for name in STATE_BUFFERS + (ADAPTIVE_BUFFERS if self.alpha_mode == ADAPTIVE else ()):
            buf = getattr(self, name)
            if buf.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buf.float())
        return self

    def _check_input(self, x: Tensor) -> None:
        if x.ndim not in self._ranks:
            ranks = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"{type(self).__name__} expects {ranks} input (N, C, ...); got {x.ndim}D input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels (input shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training and x.numel() > 0:  # an empty batch (or empty positions) is no sample of the stream
            z = self._train_forward(x)
        else:
            z = self.frozen_forward(x, self._frozen_clamp() if self.ecm == CLAMP else None)
        return layer_scale(z, self.ls_eps).to(x.dtype) if self.ecm == LAYER_SCALING else z

    def _train_forward(self, x: Tensor) -> Tensor:
        """Training output before layer scaling; advances the state buffers (u, v in backward)."""
        # Layer scaling takes z in the statistics' precision: its mean of squares overflows half precision.
        z_dtype = self.running_mean.dtype if self.ecm == LAYER_SCALING else x.dtype
        name = self.layer_name or f"{type(self).__name__}({self.num_features})"
        clamp_value = self.clamp_value if self.ecm == CLAMP else None
        adaptive = self.alpha_mode == ADAPTIVE
        state = (self.running_mean, self.running_var, self.u_ctrl, self.v_ctrl, self.alpha_now if adaptive else None)
        settings = (self.alpha_fwd, self.alpha_bkw, self.eps, clamp_value, self.clamp_mode, self.control, self.projection,
                    z_dtype, name)  # fmt: skip
        z, mean, var = train_step(x, self.weight, self.bias, *state, *settings)
        with torch.no_grad():
            if adaptive:
                alpha_next, shift = adapted_alpha(self.alpha_now, self.last_shift, self.running_mean, self.running_var, mean,
                                                  self.eps, x.shape[0])  # fmt: skip
                # Not alpha_now.copy_(): compiled (torch 2.13, Inductor, CPU), a copy_ into a 0-dim float64 buffer is
                # lost, as if the buffer were a Python float (a float64 layer's alpha would never move).
                self.alpha_now[...] = alpha_next
                self.last_shift.copy_(shift)
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        return z

    def _frozen_clamp(self) -> float | Tensor:
        """:attr:`clamp_bound`, as a tensor in ``"affine"`` mode (no host sync; traceable)."""
        return clamp_bound(self.clamp_value, self.clamp_mode, self.weight, self.bias)

    def frozen_forward(self, x: Tensor, clamp: float | Tensor | None) -> Tensor:
        """Eval-mode output before layer scaling: frozen statistics, affine, optional clamp."""
        scale, shift = frozen_affine(self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        z = torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))
        return z if clamp is None else z.clamp(-clamp, clamp)

    def extra_repr(self) -> str:
        ecm = f"ecm={self.ecm!r}"
        if self.ecm == CLAMP:
            ecm += f", clamp_value={self.clamp_value}" + (
                f", clamp_mode={self.clamp_mode!r}" if self.clamp_mode != FIXED else ""
            )
        control = f", control={self.control!r}" if self.control != EXACT else ""
        alpha_mode = f", alpha_mode={self.alpha_mode!r}" if self.alpha_mode == ADAPTIVE else ""
        projection = f", projection={self.projection!r}" if self.projection != NONE else ""
        return (
            f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"eps={self.eps}, affine={self.affine}, {ecm}{control}{alpha_mode}{projection}"
        )


class OnlineNorm1d(OnlineNormBase):
    """Online Normalization for ``(N, C)`` or ``(N, C, L)`` inputs (replaces ``BatchNorm1d``)."""

    _ranks = (2, 3)


class OnlineNorm2d(OnlineNormBase):
    """Online Normalization for ``(N, C, H, W)`` inputs (replaces ``BatchNorm2d``)."""

    _ranks = (4,)


class OnlineNorm3d(OnlineNormBase):
    """Online Normalization for ``(N, C, D, H, W)`` inputs (replaces ``BatchNorm3d``)."""

    _ranks = (5,)
