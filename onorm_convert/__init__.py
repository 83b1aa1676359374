"""onorm: convert BatchNorm models to Online Normalization, and fold them back for deployment.

The pipeline, one module a stage: load -> convert -> fold -> export -> verify (docs/architecture.md).
"""

from .checkpoint import save_checkpoint
from .convert import convert, revert
from .export import export_onnx, export_torch
from .fold import fold, fold_with_report
from .layers import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d, OnlineNormAct2d, OnlineNormBase
from .load import load_model
from .options import ConvertOptions, ExportOptions

__version__ = "0.1.0"

__all__ = [
    "ConvertOptions",
    "ExportOptions",
    "OnlineNorm1d",
    "OnlineNorm2d",
    "OnlineNorm3d",
    "OnlineNormAct2d",
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
