"""`onorm convert --inputs`: the converted model's predictions on real data, against the original's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sample_models import models
from sample_models.train import load_digits_split

from conftest import RESNET, RESNET_ARCH, onorm

pytestmark = pytest.mark.usefixtures("in_repo")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The 360 held-out digits, as `make demo` writes them."""
    path = tmp_path_factory.mktemp("inputs") / "digits_test.npy"
    np.save(path, models.shape_digits("digits_resnet", load_digits_split()[2]).numpy().astype(np.float32))
    return path


def convert(*args):
    return onorm("convert", RESNET, "--arch", RESNET_ARCH, "--json", *args)


def test_the_defaults_keep_every_prediction_of_the_demo_model(tmp_path, held_out):
    result = convert("--inputs", held_out, "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, result.output
    agreement = json.loads(result.stdout)["agreement"]
    assert (agreement["samples"], agreement["changed"], agreement["agreement"], agreement["logits"]) == (
        360,
        0,
        1.0,
        True,
    )
    assert 0 < agreement["max_abs_change"] < 1.0
    assert {layer["layer"] for layer in agreement["clamp"]} == {"1", "3.bn1", "3.bn2", "5.bn1", "5.bn2"}
    assert (tmp_path / "out.pt").is_file()


def test_predictions_that_change_fail_the_conversion_unless_allowed(tmp_path, held_out):
    result = convert("--inputs", held_out, "--clamp-mode", "fixed", "-o", tmp_path / "out.pt")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["agreement"]["changed"] > 0 and report["error"]["type"] == "VerificationError"
    assert "predictions on the real inputs changed" in report["error"]["message"] and not (tmp_path / "out.pt").exists()
    allowed = convert(
        "--inputs", held_out, "--clamp-mode", "fixed", "--min-agreement", "0.9", "-o", tmp_path / "out.pt"
    )
    assert allowed.exit_code == 0 and (tmp_path / "out.pt").is_file()


def test_without_inputs_it_says_only_random_inputs_were_checked(tmp_path):
    result = convert("--input-shape", "1,1,8,8", "-o", tmp_path / "out.pt")
    assert result.exit_code == 0
    assert "only random inputs were checked; pass --inputs FILE" in result.stderr
    assert json.loads(result.stdout)["agreement"] is None


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_min_agreement_is_a_fraction(tmp_path, held_out, value):
    result = convert("--inputs", held_out, "--min-agreement", value, "-o", tmp_path / "out.pt")
    assert result.exit_code == 2 and f"--min-agreement {float(value)}: must be a fraction in [0, 1]" in result.stderr
