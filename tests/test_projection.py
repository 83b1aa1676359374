"""``projection="batch"`` (convert's default) beyond the layer: what it does for the weights before it, and files.

The layer itself is checked against its per-sample reference in ``test_layers_finetune.py``.
"""

from __future__ import annotations

import pytest
import torch

from onorm_convert import convert, load_model, save_checkpoint

from conftest import onorm


def _model():
    """The arch the checkpoint tests name (``test_projection:_model``): a conv without bias, a BatchNorm, a ReLU."""
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def _radial_share(projection: str, batch: int) -> float:
    """``|<dL/dW, W>| / (|dL/dW| |W|)`` of the conv before the converted norm, after one backward (clamp off)."""
    torch.manual_seed(0)
    model = convert(_model(), projection=projection, ecm="none").double().train()
    x = torch.randn(batch, 2, 7, 7, dtype=torch.float64) + 0.3
    (model(x) * torch.randn(batch, 4, 5, 5, dtype=torch.float64)).sum().backward()
    weight = model[0].weight.detach()
    return float((model[0].weight.grad * weight).sum().abs() / (model[0].weight.grad.norm() * weight.norm()))


def test_the_conv_before_a_projected_layer_gets_no_radial_gradient():
    """As under BatchNorm, the output no longer depends on the weights' scale within a batch, so their gradient is
    orthogonal to them and SGD does not grow their norm at first order (the lr-0.1 failure, docs/finetune.md)."""
    assert _radial_share("batch", 16) < 1e-4  # eps in the fit's variance, not rounding
    assert _radial_share("none", 16) > 1e-2
    assert _radial_share("batch", 1) == pytest.approx(_radial_share("none", 1), rel=1e-12)  # one sample: the doc's


def test_convert_defaults_to_it_and_files_keep_the_choice(tmp_path):
    assert convert(_model())[1].projection == "batch"
    assert "projection='batch'" in repr(convert(_model())[1])
    converted = convert(_model(), projection="none")
    assert converted[1].projection == "none" and "projection" not in repr(converted[1])
    path = tmp_path / "plain.pt"
    save_checkpoint(converted, path, arch="test_projection:_model")
    assert load_model(path)[1].projection == "none"


def test_a_checkpoint_from_before_it_comes_back_with_the_docs_gradient(tmp_path):
    """Layer records without ``projection`` (older onorm): the layers train on as they were made to."""
    path = tmp_path / "old.pt"
    save_checkpoint(convert(_model()), path, arch="test_projection:_model")
    checkpoint = torch.load(path, weights_only=True)
    for entry in checkpoint["layers"].values():
        del entry["config"]["projection"]
    torch.save(checkpoint, path)  # the signature covers the code, not the layer records
    assert load_model(path)[1].projection == "none"


@pytest.mark.usefixtures("in_repo")
def test_the_cli_flag_reaches_the_layers(tmp_path):
    source = tmp_path / "mlp.pt"
    from sample_models.models import digits_mlp

    torch.save(digits_mlp().state_dict(), source)
    for flag in ("none", "batch"):
        output = tmp_path / f"mlp_{flag}.pt"
        result = onorm(
            "convert", source, "--arch", "sample_models.models:digits_mlp", "--projection", flag, "-o", output
        )
        assert result.exit_code == 0, result.stderr
        layers = [m for m in load_model(output).modules() if hasattr(m, "projection")]
        assert layers and all(layer.projection == flag for layer in layers)
