"""OnlineNormAct2d: OnlineNorm2d, then a dropout, then an activation (replaces timm's norm-act layers)."""

from __future__ import annotations

from torch import Tensor, nn

from .online_norm import OnlineNorm2d


class OnlineNormAct2d(OnlineNorm2d):
    """Online Normalization for ``(N, C, H, W)`` inputs followed by ``drop`` and ``act``, in that order.

    What timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` compute
    around their norm. ``drop`` and ``act`` are any modules (``nn.Identity`` when not given);
    the other arguments are :class:`OnlineNorm2d`'s. ``reverts_to`` is the class the layer
    replaced (set by convert and by a checkpoint's rebuild; None when unknown), which
    :func:`onorm_convert.revert` builds back.
    """

    def __init__(
        self, num_features: int, *args, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act
        self.reverts_to: type[nn.Module] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))
