"""OnlineNorm with the inputs real models feed it: half precision, autocast, memory layouts, constant channels.

Every case is checked against the float64 per-sample reference run on the very values
the layer saw (half-precision inputs rounded first). Tolerances: a half-precision result
computed in float32 and rounded once is within the unit roundoff ``u`` of the exact one
(bfloat16: 8 significant bits, u = 2**-8; float16: 11 bits, u = 2**-11); layer scaling
adds a few half-precision operations (square, mean, rsqrt, product) so gets 4u. What
stays float32 (state buffers, parameter gradients) must be float32-accurate (1e-5).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d
from onorm_convert.layers import STATE_BUFFERS

from conftest import assert_matches, layer_step, reference_of, reference_step

pytestmark = pytest.mark.usefixtures("eager_kernels", "one_thread")

UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
FLOAT32_RTOL = 1e-5
ACTIVATION_KEYS = ("out", "grad_x")
ECMS = ("clamp", "layer_scaling", "none")


def _layer(cls, channels, ecm="clamp"):
    """A layer with alphas far from 1 (three steps move the state visibly) and random affine parameters."""
    layer = cls(channels, alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer


def _batch(shape, dtype, offset=1.0):
    """(x, grad_out): x = offset + 2 * N(0, 1) and grad_out = N(0, 1), rounded to ``dtype``."""
    return (torch.randn(shape) * 2 + offset).to(dtype), torch.randn(shape).to(dtype)


def _check_half_step(actual, expected, dtype, ecm, context):
    """Activation-shaped results within their rounding budget, float32 results float32-accurate."""
    u = UNIT_ROUNDOFF[dtype] * (4 if ecm == "layer_scaling" else 1)
    assert_matches({k: actual[k] for k in ACTIVATION_KEYS}, {k: expected[k] for k in ACTIVATION_KEYS}, u, context)
    rest = [k for k in expected if k not in ACTIVATION_KEYS]
    assert_matches({k: actual[k] for k in rest}, {k: expected[k] for k in rest}, FLOAT32_RTOL, context)


@pytest.mark.parametrize("ecm", ECMS)
@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=["bf16", "f16"])
@pytest.mark.parametrize("cls, shape", [(OnlineNorm1d, (16, 3)), (OnlineNorm2d, (16, 3, 4, 4))], ids=["1d", "2d"])
@pytest.mark.slow
def test_half_precision_inputs(cls, shape, dtype, ecm):
    torch.manual_seed(0)
    layer = _layer(cls, shape[1], ecm)
    reference = reference_of(layer)
    for step in range(3):
        x, grad_out = _batch(shape, dtype)
        actual = layer_step(layer, x, grad_out)
        assert actual["out"].dtype == actual["grad_x"].dtype == dtype
        assert all(getattr(layer, name).dtype == torch.float32 for name in STATE_BUFFERS)
        _check_half_step(actual, reference_step(reference, x, grad_out), dtype, ecm, f"{dtype} {ecm} step {step}")


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=["bf16", "f16"])
def test_module_cast_to_half_keeps_float32_state(dtype):
    torch.manual_seed(1)
    layer = _layer(OnlineNorm2d, 3).to(dtype)
    assert layer.weight.dtype == dtype
    assert all(getattr(layer, name).dtype == torch.float32 for name in STATE_BUFFERS)
    reference = reference_of(layer)  # holds the half-precision weights, exactly
    for step in range(3):
        x, grad_out = _batch((8, 3, 4, 4), dtype)
        actual = layer_step(layer, x, grad_out)
        assert all(getattr(layer, name).dtype == torch.float32 for name in STATE_BUFFERS)
        expected = reference_step(reference, x, grad_out)
        for key in ("grad_weight", "grad_bias"):  # parameter gradients come back in the parameters' dtype
            assert actual[key].dtype == dtype
            assert_matches({key: actual.pop(key)}, {key: expected.pop(key)}, UNIT_ROUNDOFF[dtype], f"step {step}")
        _check_half_step(actual, expected, dtype, "clamp", f"{dtype} step {step}")


def test_cpu_autocast_bfloat16():
    """Under CPU autocast the conv hands the layer bfloat16; the layer keeps float32 state and matches."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), _layer(OnlineNorm2d, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    )
    norm = model[1]
    reference = reference_of(norm)
    seen = {}

    def capture(module, inputs, output):
        inputs[0].retain_grad()
        output.retain_grad()
        seen.update(x=inputs[0], out=output)

    norm.register_forward_hook(capture)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 2, 4, 4)).float().square().mean()
        loss.backward()
        x, out = seen["x"], seen["out"]
        assert x.dtype == out.dtype == torch.bfloat16
        assert all(getattr(norm, name).dtype == torch.float32 for name in STATE_BUFFERS)
        actual = {"out": out.detach(), "grad_x": x.grad, "grad_weight": norm.weight.grad, "grad_bias": norm.bias.grad}
        actual.update({name: getattr(norm, name) for name in STATE_BUFFERS})
        _check_half_step(actual, reference_step(reference, x, out.grad), torch.bfloat16, "clamp", f"step {step}")
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad(set_to_none=True)


LAYOUTS = {  # name: (layer class, function making a non-standard tensor from a contiguous one)
    "channels_last": (OnlineNorm2d, lambda t: t.contiguous(memory_format=torch.channels_last)),
    "channels_last_3d": (OnlineNorm3d, lambda t: t.contiguous(memory_format=torch.channels_last_3d)),
    "transposed": (OnlineNorm2d, lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
    "strided": (OnlineNorm2d, lambda t: torch.stack((t, t), dim=-1)[..., 0]),
    "1d-transposed": (OnlineNorm1d, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
}
SHAPES = {OnlineNorm1d: (6, 3, 5), OnlineNorm2d: (6, 3, 4, 5), OnlineNorm3d: (6, 3, 2, 3, 4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_memory_layouts(layout, dtype):
    """channels_last and non-contiguous inputs (and gradients) give the reference's results."""
    cls, relayout = LAYOUTS[layout]
    torch.manual_seed(3)
    layer = _layer(cls, 3).to(dtype)
    reference = reference_of(layer)
    for step in range(3):
        x, grad_out = _batch(SHAPES[cls], dtype)
        x, grad_out = relayout(x), relayout(grad_out)
        assert not x.is_contiguous()
        actual = layer_step(layer, x, grad_out)
        rtol = 1e-10 if dtype == torch.float64 else FLOAT32_RTOL
        assert_matches(actual, reference_step(reference, x, grad_out), rtol, f"{layout} step {step}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ecm", ECMS)
def test_constant_channels(ecm, dtype):
    """Channels with zero variance, in every sample and in the state (a BatchNorm of a constant channel)."""
    torch.manual_seed(4)
    layer = _layer(OnlineNorm2d, 3, ecm).to(dtype)
    with torch.no_grad():  # channel 2 starts as if converted from a BatchNorm that only saw the value 3
        layer.running_mean[2], layer.running_var[2] = 3.0, 0.0
    reference = reference_of(layer)
    for step in range(3):
        x, grad_out = _batch((8, 3, 4, 4), dtype)
        x[:, 1] = -2.0  # constant from the first sample on: the state must learn it
        x[:, 2] = 3.0
        actual = layer_step(layer, x, grad_out)
        assert all(torch.isfinite(t).all() for t in actual.values())
        rtol = 1e-10 if dtype == torch.float64 else FLOAT32_RTOL
        assert_matches(actual, reference_step(reference, x, grad_out), rtol, f"{ecm} step {step}")
    layer.eval()
    with torch.no_grad():
        frozen = layer(x)
    assert torch.isfinite(frozen).all()
