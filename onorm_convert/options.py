"""The conversion options, defined once: the API's keywords, the checkpoint's record and the CLI's flags use them."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import OptionError
from .layers import OnlineNormBase
from .layers.functional import CONTROLS, ECMS
from .layers.online_norm import CLAMP_MODES


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

    def __post_init__(self) -> None:
        for name in ("clamp_value", "alpha_fwd", "alpha_bkw"):
            if not _is_finite_number(getattr(self, name)):
                raise OptionError(name, getattr(self, name), "must be a finite number")
        for name in ("alpha_fwd", "alpha_bkw"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise OptionError(name, getattr(self, name), "must be in [0, 1), e.g. 0.999")
        if not self.clamp_value > 0:
            raise OptionError("clamp_value", self.clamp_value, "must be positive, e.g. 5")
        for name, allowed in (("ecm", ECMS), ("control", CONTROLS), ("clamp_mode", CLAMP_MODES)):
            if getattr(self, name) not in allowed:
                raise OptionError(name, getattr(self, name), f"must be one of {', '.join(allowed)}")

    @classmethod
    def of(cls, layer: OnlineNormBase) -> ConvertOptions:
        """The options ``layer`` was made with."""
        return cls(**{option.name: getattr(layer, option.name) for option in fields(cls)})


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False
