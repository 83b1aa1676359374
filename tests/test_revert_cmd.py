"""`onorm revert`: a converted checkpoint back to a BatchNorm state dict the original code loads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sample_models import models

from conftest import MLP, MLP_ARCH, onorm

pytestmark = pytest.mark.usefixtures("in_repo")


def test_convert_then_revert_gives_back_the_original_model(tmp_path):
    assert onorm("convert", MLP, "--arch", MLP_ARCH, "-o", tmp_path / "mlp_onorm.pt").exit_code == 0
    result = onorm("revert", tmp_path / "mlp_onorm.pt", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == str(tmp_path / "mlp_onorm_bn.pt") and report["output_format"] == "state_dict"
    assert report["reverted"] and any("clamp" in w for w in report["warnings"])  # BatchNorm has no clamp
    original, reverted = models.digits_mlp(), models.digits_mlp()
    original.load_state_dict(torch.load(MLP, weights_only=True))
    reverted.load_state_dict(torch.load(tmp_path / "mlp_onorm_bn.pt", weights_only=True))  # strict: the same keys
    x = torch.randn(8, 64)
    torch.testing.assert_close(reverted.eval()(x), original.eval()(x), rtol=1e-6, atol=1e-6)
    again = onorm("revert", tmp_path / "mlp_onorm.pt")
    assert again.exit_code == 2 and "--force" in again.stderr


def test_inspect_says_what_a_model_without_batchnorm_has(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2), nn.LayerNorm([2, 4, 4]))
    torch.save(model, tmp_path / "gn.pt")
    result = onorm("inspect", tmp_path / "gn.pt", "--trust")
    assert result.exit_code == 0 and "found GroupNorm x1, LayerNorm x1; onorm converts BatchNorm" in result.stdout
