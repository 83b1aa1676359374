"""The layers' departures from the doc, each against a per-sample reference of its own equations; the state guard.

- ``control="stable"``: v advances by ``v = (v_prev + mean(g y)) / (1 + (1 - a_b) mean(y^2))``
  (``tests/reference.py`` writes that equation in its per-sample loop);
- ``clamp_mode="affine"``: the clamp bounds z by ``max(|beta| + c |gamma|)``, computed here from
  the parameters and given to the reference as its clamp value;
- ``projection="batch"``: in a batch of two samples or more, backward then takes from each
  channel's input gradient its fit on the constant and the centred input within the batch
  (the reference fits it channel by channel after its per-sample loop).

Both paths (native kernels and scans), several steps so that state carries over, float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, convert
from onorm_convert.layers import OnlineNormStateError
from onorm_convert.layers.functional import check_state

from conftest import (
    TRAINING_PATHS,
    assert_matches,
    assert_no_worse_than_loop,
    layer_step,
    reference_of,
    reference_step,
    state_of,
    training_path,
)
from reference import ReferenceOnlineNorm

ALPHA_FWD, ALPHA_BKW = 0.9, 0.8
KINDS = {  # (layer class, per-sample shape, memory format)
    "dense": (OnlineNorm1d, (4,), torch.contiguous_format),
    "seq": (OnlineNorm1d, (4, 6), torch.contiguous_format),
    "2d": (OnlineNorm2d, (4, 3, 3), torch.contiguous_format),
    "2d-channels-last": (OnlineNorm2d, (4, 3, 3), torch.channels_last),
}


def _layer(cls, channels, var_range=(0.5, 2.0), **options):
    layer = cls(channels, alpha_fwd=ALPHA_FWD, alpha_bkw=ALPHA_BKW, clamp_value=1.5, **options).double()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(*var_range)
        layer.u_ctrl.normal_(std=0.1)
        layer.v_ctrl.normal_(std=0.1)
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def _reference(layer, clamp_value, control, projection="none"):
    state = [getattr(layer, name).detach().clone() for name in ("running_mean", "running_var", "u_ctrl", "v_ctrl")]
    params = [layer.weight.detach().clone(), layer.bias.detach().clone()]
    return ReferenceOnlineNorm(
        *state, *params, ALPHA_FWD, ALPHA_BKW, layer.eps, layer.ecm, clamp_value, layer.ls_eps, control, projection
    )


def _batch(shape, memory_format, scale=2.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + 0.5
    return x.contiguous(memory_format=memory_format), torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("batch", [1, 5, 37])  # 37: the scans' blocks of 16 and a partial one
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_stable_control_matches_its_per_sample_reference(path, kind, batch):
    torch.manual_seed(batch + len(kind))
    cls, sample_shape, memory_format = KINDS[kind]
    # A small running variance: mean(y^2) far above 2 / (1 - a_b), where the doc's v step amplifies.
    layer = _layer(cls, sample_shape[0], var_range=(0.02, 0.1), control="stable", ecm="none")
    stable, exact = _reference(layer, layer.clamp_bound, "stable"), _reference(layer, layer.clamp_bound, "exact")
    for step in range(3):
        x, grad = _batch((batch, *sample_shape), memory_format)
        with training_path(path):
            actual = layer_step(layer, x, grad)
        expected = reference_step(stable, x, grad)
        assert_matches(actual, expected, rtol=1e-10, context=f"{path} {kind} step {step}")
        reference_step(exact, x, grad)
    # The mode changes the math: the doc's recurrence has run far from the stable one.
    assert not torch.allclose(exact.v, stable.v, rtol=0.1)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_affine_clamp_matches_the_reference_with_the_bound_from_beta_and_gamma(path, kind):
    torch.manual_seed(len(kind))
    cls, sample_shape, memory_format = KINDS[kind]
    layer = _layer(cls, sample_shape[0], clamp_mode="affine")
    bound = float((layer.bias.detach().abs() + 1.5 * layer.weight.detach().abs()).max())
    assert layer.clamp_bound == pytest.approx(bound, rel=1e-12) and layer.clamp_value == 1.5
    reference = _reference(layer, bound, "exact")
    beyond_fixed = 0
    for step in range(3):
        x, grad = _batch((16, *sample_shape), memory_format, scale=6.0)
        with training_path(path):
            actual = layer_step(layer, x, grad)
        assert_matches(actual, reference_step(reference, x, grad), rtol=1e-10, context=f"{path} {kind} step {step}")
        beyond_fixed += int((actual["out"].abs() > 1.5).sum())
        assert actual["out"].abs().max() <= bound
    assert beyond_fixed > 0  # outputs the doc's fixed clamp (1.5) would have cut


@pytest.mark.parametrize("batch", [1, 2, 37])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_batch_projection_matches_its_per_sample_reference(path, kind, batch):
    torch.manual_seed(batch + 3 * len(kind))
    cls, sample_shape, memory_format = KINDS[kind]
    layer = _layer(cls, sample_shape[0], control="stable", projection="batch")
    projected = _reference(layer, layer.clamp_bound, "stable", "batch")
    plain = _reference(layer, layer.clamp_bound, "stable")
    for step in range(3):
        x, grad = _batch((batch, *sample_shape), memory_format)
        with training_path(path):
            actual = layer_step(layer, x, grad)
        expected, doc = reference_step(projected, x, grad), reference_step(plain, x, grad)
        assert_matches(actual, expected, rtol=1e-10, context=f"{path} {kind} step {step}")
        # The forward, the parameters' gradients and the control state are the doc's; only grad_x differs, and only
        # in a batch of two or more, where no component along the constant or the centred input is left.
        assert_matches({k: v for k, v in actual.items() if k != "grad_x"}, {k: v for k, v in doc.items() if k != "grad_x"},
                       rtol=1e-10, context=f"{path} {kind} step {step}")  # fmt: skip
        channel_values = (0, *range(2, x.ndim))
        if batch == 1:
            torch.testing.assert_close(actual["grad_x"], doc["grad_x"], rtol=1e-10, atol=0)
        else:
            xc = x - x.mean(channel_values, keepdim=True)
            scale = doc["grad_x"].abs().max() * x.numel()
            assert actual["grad_x"].sum(channel_values).abs().max() < 1e-10 * scale
            # Not quite 0 along xc: the fit divides by the variance + eps, as BatchNorm's does.
            assert (actual["grad_x"] * xc).sum(channel_values).abs().max() < 1e-4 * scale * xc.abs().max()
            assert not torch.allclose(actual["grad_x"], doc["grad_x"], rtol=1e-3)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_batch_projection_in_float32_is_as_accurate_as_a_float32_loop(path, kind):
    """The fit subtracts most of the gradient: float32 may lose digits there, but no more than the plain loop does."""
    torch.manual_seed(7 + len(kind))
    cls, sample_shape, memory_format = KINDS[kind]
    layer = _layer(cls, sample_shape[0], control="stable", projection="batch").float()
    reference, loop = reference_of(layer), reference_of(layer, torch.float32)
    for step in range(3):
        x, grad = (t.float() for t in _batch((16, *sample_shape), memory_format))
        with training_path(path):
            actual = layer_step(layer, x.contiguous(memory_format=memory_format), grad)
        expected, in_float32 = reference_step(reference, x, grad), reference_step(loop, x, grad)
        assert_no_worse_than_loop(actual, expected, in_float32, 10, 1e-6, f"{path} {kind} step {step}")


def test_affine_clamp_of_a_fresh_layer_is_the_fixed_clamp():
    layer = OnlineNorm2d(3, clamp_value=2.5, clamp_mode="affine")
    assert layer.clamp_bound == 2.5
    with torch.no_grad():
        layer.weight[1] = -3.0
        layer.bias[2] = 0.5
    assert layer.clamp_bound == pytest.approx(7.5) and layer.clamp_value == 2.5


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="control must be one of exact, stable"):
        OnlineNorm1d(3, control="implicit")
    with pytest.raises(ValueError, match="clamp_mode must be one of fixed, affine"):
        OnlineNorm1d(3, clamp_mode="per-channel")
    with pytest.raises(ValueError, match="projection must be one of none, batch"):
        OnlineNorm1d(3, projection="sample")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_a_non_finite_input_raises_naming_the_layer_and_keeps_its_state(path, bad):
    model = convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))).train()
    before = state_of(model[1])
    x = torch.randn(4, 2, 5, 5)
    x[2, 1, 0, 0] = bad
    with (
        training_path(path),
        pytest.raises(OnlineNormStateError, match=r"layer '1': running_mean became NaN/Inf"),
    ):
        model(x)
    for name, value in state_of(model[1]).items():
        assert torch.equal(value, before[name]), name


def _runaway_setting(control: str):
    """Slow statistics far below the activations (mean(y^2) from 1e6 down to 1e3): the doc's v decays are -2e5 .. -200.

    float32 state: sixteen such decays take v past float32's range.
    """
    layer = OnlineNorm1d(3, alpha_fwd=0.9999, alpha_bkw=0.8, control=control, ecm="none")
    with torch.no_grad():
        layer.running_var.fill_(1e-4)
    torch.manual_seed(0)
    return layer, torch.randn(16, 3, 5) * 10, torch.randn(16, 3, 5)


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_a_runaway_control_raises_naming_the_fix_and_keeps_the_state(path):
    layer, x, grad = _runaway_setting("exact")
    before = state_of(layer)
    with training_path(path), pytest.raises(OnlineNormStateError) as raised:
        layer_step(layer, x, grad)
    message = str(raised.value)
    assert "OnlineNorm1d(3)" in message and "_ctrl became NaN/Inf in a training backward" in message
    assert "ran away" in message and "control='stable'" in message
    assert torch.equal(layer.u_ctrl, before["u_ctrl"]) and torch.equal(layer.v_ctrl, before["v_ctrl"])


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_the_stable_control_stays_bounded_where_the_exact_one_runs_away(path):
    layer, x, grad = _runaway_setting("stable")
    with training_path(path):
        layer_step(layer, x, grad)
    assert torch.isfinite(layer.v_ctrl).all()
    # Each sample adds |mean(g y)| / (1 + cb m2) <= rms(g) sqrt(m2) / (1 + cb m2) <= rms(g) / (2 sqrt(cb)), cb = 1 - a_b,
    # whatever y is; from v_0 = 0 the batch's 16 samples can reach at most 16 times that.
    bound = len(x) * float(grad.square().mean(2).sqrt().max()) / (2 * (1 - 0.8) ** 0.5)
    assert layer.v_ctrl.abs().max() <= bound


def test_the_guard_stops_only_non_finite_state():
    """Finite states of any size go on (the doc's equations are exact there); NaN or Inf in any buffer stops."""
    check_state("x", {"u_ctrl": torch.zeros(2), "v_ctrl": torch.tensor([1.0, -1e38])}, forward=False)
    check_state(
        "x", {"running_mean": torch.tensor([1e300], dtype=torch.float64), "running_var": torch.ones(1)}, forward=True
    )
    for bad in (float("nan"), float("inf")):
        with pytest.raises(OnlineNormStateError, match=r"layer 'x': u_ctrl became NaN/Inf in a training backward pass"):
            check_state("x", {"u_ctrl": torch.tensor([0.0, bad]), "v_ctrl": torch.zeros(2)}, forward=False)
        with pytest.raises(
            OnlineNormStateError, match=r"layer 'x': running_var became NaN/Inf in a training forward pass"
        ):
            check_state("x", {"running_mean": torch.zeros(1), "running_var": torch.tensor([bad])}, forward=True)
