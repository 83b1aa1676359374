"""Converting a trained model with the default options keeps its predictions on real data (issue 10).

The shipped sample models on the 360 held-out digits that ``sample_models/test_inputs.py``
writes for ``make demo``: eval mode, the BatchNorm original against ``convert(model)``.
"""

from __future__ import annotations

import pytest
import torch

from onorm_convert import convert
from sample_models import models
from sample_models.train import load_digits_split


@pytest.mark.parametrize("name", list(models.INPUT_SHAPES))
@pytest.mark.slow
def test_default_conversion_changes_no_held_out_prediction(name):
    original = getattr(models, name)()
    original.load_state_dict(torch.load(f"sample_models/{name}.pt", weights_only=True))
    x = models.shape_digits(name, load_digits_split()[2])
    assert len(x) == 360
    with torch.no_grad():
        before, after = original.eval()(x), convert(original).eval()(x)
    changed = int((before.argmax(1) != after.argmax(1)).sum())
    assert changed == 0, f"{name}: {changed} of 360 predictions changed by conversion"
