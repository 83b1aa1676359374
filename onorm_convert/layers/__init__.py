"""Online Normalization layers (one concept per file: scan, functional math, modules)."""

from .online_norm import STATE_BUFFERS, OnlineNorm1d, OnlineNorm2d, OnlineNorm3d, OnlineNormBase, normalize_ecm

__all__ = ["STATE_BUFFERS", "OnlineNorm1d", "OnlineNorm2d", "OnlineNorm3d", "OnlineNormBase", "normalize_ecm"]
