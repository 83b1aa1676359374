"""onorm: convert BatchNorm models to Online Normalization, and fold them back for deployment."""

from .checkpoint import save_checkpoint
from .convert import convert, revert
from .export import export_onnx, export_torch
from .fold import fold, fold_with_report
from .layers import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d, OnlineNormBase
from .load import load_model

__version__ = "0.1.0"

__all__ = [
    "OnlineNorm1d",
    "OnlineNorm2d",
    "OnlineNorm3d",
    "OnlineNormBase",
    "__version__",
    "convert",
    "export_onnx",
    "export_torch",
    "fold",
    "fold_with_report",
    "load_model",
    "revert",
    "save_checkpoint",
]
