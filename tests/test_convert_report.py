"""What `onorm convert` tells a pipeline: the key it used, what it dropped, its warnings, and when nothing converted."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import onorm_convert as oc
from onorm_convert.convert import ConversionWarning

from conftest import MLP, MLP_ARCH, onorm

pytestmark = pytest.mark.usefixtures("in_repo")


def test_a_training_checkpoint_reports_the_key_used_and_the_keys_dropped(tmp_path):
    torch.save(
        {"model": torch.load(MLP, weights_only=True), "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt"
    )
    result = onorm("convert", tmp_path / "ckpt.pt", "--arch", MLP_ARCH, "-o", tmp_path / "out.pt", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["key"], report["dropped_keys"]) == ("model", ["epoch", "optimizer"])
    assert report["warnings"] == ["no --input-shape: the conversion was not checked on an example input"]
    assert report["seconds"]["total"] > 0


def test_a_model_without_batchnorm_says_what_it_has():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2), nn.GroupNorm(1, 2), nn.LayerNorm(2))
    with pytest.warns(ConversionWarning, match="found GroupNorm x2, LayerNorm x1; onorm converts BatchNorm"):
        oc.convert(model)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--include", "nothing.like.this"], "--include 'nothing.like.this' matches no module of the model"),
        (["--exclude", "*"], "no normalization layer was converted"),
    ],
)
def test_require_converted_fails_a_pipeline_that_converted_nothing(tmp_path, flags, message):
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", tmp_path / "out.pt", *flags, "--require-converted")
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out.pt").exists()
    without = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", tmp_path / "out.pt", *flags)
    assert without.exit_code == 0 and "onorm: warning:" in without.stderr


def test_an_include_that_matches_nothing_is_a_warning_in_the_library():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        oc.convert(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), include=["typo"])
    assert any("--include 'typo' matches no module" in str(w.message) for w in caught)
