"""The conversion and export options, each defined once and checked here: the API's keywords, the checkpoint's
record and the CLI's flags use them, and an out-of-range value is an :class:`OptionError` naming the option."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

from .errors import OptionError
from .layers import OnlineNormBase, normalize_ecm
from .layers.adaptive_alpha import ALPHA_MODES
from .layers.functional import CONTROLS, ECMS, PROJECTIONS
from .layers.online_norm import CLAMP_MODES

Tolerance = float | Mapping[str, float]  # one for all outputs, or per output label (with "*" as the default)

MIN_OPSET = 18  # the exporter's own operator library starts here; lower needs a lossy version conversion
MAX_OPSET = 23  # the highest the installed torch exporter targets (torch.onnx._constants.ONNX_MAX_OPSET)


@dataclass(frozen=True)
class ConvertOptions:
    """The OnlineNorm settings every converted layer gets; an out-of-range value is an :class:`OptionError`."""

    ecm: str = "clamp"
    clamp_value: float = 5.0
    # Faster than the layers' own defaults (the doc's 0.999 / 0.99, tuned for training from scratch): a
    # converted model trains on at BatchNorm's learning rate, and statistics with a memory of ~1000
    # samples lag its moving weights until the clamp cuts a third of the activations (docs/finetune.md).
    alpha_fwd: float = 0.99
    alpha_bkw: float = 0.9
    control: str = "stable"  # OnlineNormBase's control: "stable" (bounded v decay) or "exact" (the doc's)
    clamp_mode: str = "affine"  # OnlineNormBase's clamp_mode: "affine" (keeps a trained model's outputs) or "fixed"
    # OnlineNormBase's alpha_mode: "adaptive" (alpha_fwd is where each layer's starts: no fixed memory suits both a
    # fast SGD recipe and a slow AdamW one) or "fixed" (the doc's).
    alpha_mode: str = "adaptive"
    # OnlineNormBase's projection: "batch" (in a batch of 2+, backward removes what BatchNorm's gradient removes within
    # the batch: at SGD lr 0.1 the controls alone let the weights' norms run up, docs/finetune.md) or "none" (the doc's).
    projection: str = "batch"

    def __post_init__(self) -> None:
        try:  # one spelling of each ECM ("layer-scaling" and None are accepted)
            object.__setattr__(self, "ecm", normalize_ecm(self.ecm))
        except ValueError as err:
            raise OptionError("ecm", self.ecm, "expected clamp, layer-scaling or none") from err
        for name in ("clamp_value", "alpha_fwd", "alpha_bkw"):
            if not _is_finite_number(getattr(self, name)):
                raise OptionError(name, getattr(self, name), "must be a finite number")
        for name in ("alpha_fwd", "alpha_bkw"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise OptionError(name, getattr(self, name), "must be in [0, 1), e.g. 0.999")
        if not self.clamp_value > 0:
            raise OptionError("clamp_value", self.clamp_value, "must be positive, e.g. 5")
        for name, allowed in (
            ("ecm", ECMS), ("control", CONTROLS), ("clamp_mode", CLAMP_MODES), ("alpha_mode", ALPHA_MODES),
            ("projection", PROJECTIONS),
        ):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise OptionError(name, getattr(self, name), f"must be one of {', '.join(allowed)}")

    @classmethod
    def of(cls, layer: OnlineNormBase) -> ConvertOptions:
        """The options ``layer`` was made with."""
        return cls(**{option.name: getattr(layer, option.name) for option in fields(cls)})


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`~onorm_convert.export.export_model` exports and verifies; an out-of-range value is an :class:`OptionError`.

    Attributes:
        strip_clamp: remove OnlineNorm's activation clamp (from the export and the reference).
        opset: ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`; None for the exporter's default.
            Only the ONNX format uses it.
        dynamic_batch: make dim 0 of every input dynamic.
        verify: compare the exported file with the PyTorch model; when False it is published unverified.
        atol, rtol: tolerances, finite and >= 0: one for all outputs, or a mapping per output label
            (``"*"`` the default).
        keep_failed: keep a file that failed verification as ``NAME.verification-failed.EXT``.
        replace: replace a file at the destination; when False, a file there (even one that appeared
            while exporting) is left alone and the export fails with BadInputError.
    """

    strip_clamp: bool = False
    opset: int | None = None
    dynamic_batch: bool = True
    verify: bool = True
    atol: Tolerance = 1e-4
    rtol: Tolerance = 1e-3
    keep_failed: bool = False
    replace: bool = True

    def __post_init__(self) -> None:
        if self.opset is not None:
            _check_opset(self.opset)
        for name in ("atol", "rtol"):
            tolerance = getattr(self, name)
            if isinstance(tolerance, Mapping):
                for label, value in tolerance.items():
                    _check_tolerance(f"{name}[{label!r}]", value)
                # Checked once, so later changes to the caller's dict must not reach the export.
                object.__setattr__(self, name, MappingProxyType(dict(tolerance)))
            else:
                _check_tolerance(name, tolerance)


def _check_opset(opset: object) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise OptionError("opset", opset, f"must be an integer, {MIN_OPSET} to {MAX_OPSET} (or None for the default)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(
            "opset", opset, f"out of range; choose {MIN_OPSET} to {MAX_OPSET} (or leave it out for the default)"
        )


def _check_tolerance(name: str, value: object) -> None:
    if not (_is_finite_number(value) and value >= 0):
        raise OptionError(name, value, "must be a finite number >= 0, e.g. 1e-4")


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False
