"""Online Normalization layers (one concept per file: scan, functional math, modules)."""

from .functional import OnlineNormStateError
from .online_norm import (
    ADAPTIVE_BUFFERS,
    STATE_BUFFERS,
    OnlineNorm1d,
    OnlineNorm2d,
    OnlineNorm3d,
    OnlineNormBase,
    normalize_ecm,
)
from .online_norm_act import OnlineNormAct2d

ONLINE_NORMS: dict[int, type[OnlineNormBase]] = {1: OnlineNorm1d, 2: OnlineNorm2d, 3: OnlineNorm3d}  # by spatial rank

__all__ = [
    "ADAPTIVE_BUFFERS", "ONLINE_NORMS", "STATE_BUFFERS", "OnlineNorm1d", "OnlineNorm2d", "OnlineNorm3d",
    "OnlineNormAct2d", "OnlineNormBase", "OnlineNormStateError", "normalize_ecm",
]  # fmt: skip
