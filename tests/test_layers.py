"""OnlineNorm layers against the per-sample reference, over several training steps."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d
from onorm_convert.layers import STATE_BUFFERS

from conftest import TRAINING_PATHS, native_kernels, training_path
from reference import ReferenceOnlineNorm

ALPHA_FWD, ALPHA_BKW = 0.9, 0.8  # far from 1 so that three steps move the state visibly
SHAPES = {  # (layer class, per-sample shape after the batch dim)
    "1d-dense": (OnlineNorm1d, (5,)),
    "1d-seq": (OnlineNorm1d, (5, 7)),
    "2d": (OnlineNorm2d, (5, 3, 4)),
    "3d": (OnlineNorm3d, (5, 2, 3, 2)),
    "2d-channels-last": (OnlineNorm2d, (5, 3, 4)),
    "3d-channels-last": (OnlineNorm3d, (5, 2, 3, 2)),
}
MEMORY_FORMATS = {"2d-channels-last": torch.channels_last, "3d-channels-last": torch.channels_last_3d}
TOLERANCE = {torch.float64: dict(rtol=0, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _randomized_layer(cls, channels, dtype, **kwargs):
    layer = cls(channels, alpha_fwd=ALPHA_FWD, alpha_bkw=ALPHA_BKW, clamp_value=1.5, **kwargs).to(dtype)
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.u_ctrl.normal_(std=0.1)
        layer.v_ctrl.normal_(std=0.1)
        if layer.affine:
            layer.weight.normal_()
            layer.bias.normal_()
    return layer


def _reference_for(layer):
    def f64(t):
        return None if t is None else t.detach().double()

    return ReferenceOnlineNorm(
        f64(layer.running_mean), f64(layer.running_var), f64(layer.u_ctrl), f64(layer.v_ctrl),
        f64(layer.weight), f64(layer.bias), ALPHA_FWD, ALPHA_BKW, layer.eps, layer.ecm, layer.clamp_value, layer.ls_eps,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [1, 2, 64])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("ecm", ["clamp", "layer_scaling", "none"])
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_training_matches_per_sample_reference(path, kind, ecm, affine, batch, dtype):
    torch.manual_seed(
        zlib.crc32(f"{kind}-{ecm}-{affine}-{batch}".encode())
    )  # the same seed in every process, unlike hash()
    cls, sample_shape = SHAPES[kind]
    layer = _randomized_layer(cls, sample_shape[0], dtype, ecm=ecm, affine=affine)
    reference = _reference_for(layer)
    tol = TOLERANCE[dtype]
    for step in range(3):
        x = (torch.randn((batch, *sample_shape), dtype=torch.float64) * 2 + 0.5).to(dtype)
        x = x.contiguous(memory_format=MEMORY_FORMATS.get(kind, torch.contiguous_format)).requires_grad_(True)
        grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        layer.zero_grad()
        with training_path(path):
            out = layer(x)
            out.backward(grad_out)
        ref_out, ref_grad_x, ref_grad_w, ref_grad_b = reference.train_step(x.detach().double(), grad_out.double())

        checks = {
            "output": (out, ref_out),
            "grad_x": (x.grad, ref_grad_x),
            "running_mean": (layer.running_mean, reference.mu),
            "running_var": (layer.running_var, reference.var),
            "u_ctrl": (layer.u_ctrl, reference.u),
            "v_ctrl": (layer.v_ctrl, reference.v),
        }
        if affine:
            checks.update(grad_weight=(layer.weight.grad, ref_grad_w), grad_bias=(layer.bias.grad, ref_grad_b))
        for name, (actual, expected) in checks.items():
            assert actual.dtype == dtype, name
            torch.testing.assert_close(
                actual.double(), expected, **tol, msg=lambda m, step=step, name=name: f"step {step} {name}: {m}"
            )


@pytest.mark.parametrize("cls, bn_cls, shape", [
    (OnlineNorm1d, nn.BatchNorm1d, (4, 6)),
    (OnlineNorm1d, nn.BatchNorm1d, (4, 6, 9)),
    (OnlineNorm2d, nn.BatchNorm2d, (4, 6, 5, 5)),
    (OnlineNorm3d, nn.BatchNorm3d, (4, 6, 3, 4, 5)),
])  # fmt: skip
def test_eval_with_batchnorm_statistics_equals_batchnorm(cls, bn_cls, shape):
    torch.manual_seed(0)
    bn = bn_cls(shape[1])
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    layer = cls(shape[1], eps=bn.eps, ecm="none")
    layer.load_state_dict({"weight": bn.weight, "bias": bn.bias, "running_mean": bn.running_mean,
                           "running_var": bn.running_var, "u_ctrl": torch.zeros(shape[1]),
                           "v_ctrl": torch.zeros(shape[1])})  # fmt: skip
    x = torch.randn(shape) * 3
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x), rtol=1e-6, atol=1e-6)


def test_eval_mode_changes_no_state_and_still_clamps():
    layer = OnlineNorm2d(3, clamp_value=0.5).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    out = layer(torch.randn(4, 3, 5, 5) * 10)
    assert out.abs().max() == 0.5
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_state_dict_round_trip_continues_the_stream_exactly():
    torch.manual_seed(1)
    batches = [torch.randn(8, 4, 3, 3, dtype=torch.float64) for _ in range(4)]
    grads = [torch.randn(8, 4, 3, 3, dtype=torch.float64) for _ in range(4)]

    def step(layer, i):
        x = batches[i].clone().requires_grad_(True)
        layer(x).backward(grads[i])
        return x.grad

    straight = OnlineNorm2d(4, alpha_fwd=0.9).double()
    for i in range(4):
        expected = step(straight, i)
    first = OnlineNorm2d(4, alpha_fwd=0.9).double()
    for i in range(2):
        step(first, i)
    resumed = OnlineNorm2d(4, alpha_fwd=0.9).double()
    resumed.load_state_dict(first.state_dict())
    for i in range(2, 4):
        actual = step(resumed, i)
    assert torch.equal(actual, expected)
    assert torch.equal(resumed.u_ctrl, straight.u_ctrl) and torch.equal(resumed.v_ctrl, straight.v_ctrl)


def test_state_is_in_state_dict_and_stays_float32_under_half():
    layer = OnlineNorm2d(3).to(torch.bfloat16)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "u_ctrl", "v_ctrl"}
    for name in ("running_mean", "running_var", "u_ctrl", "v_ctrl"):
        assert getattr(layer, name).dtype == torch.float32
    assert layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("cls, shape, message", [
    (OnlineNorm2d, (2, 3, 4), "expects 4D input"),
    (OnlineNorm1d, (2, 3, 4, 5), "expects 2D or 3D input"),
    (OnlineNorm3d, (2, 3, 4, 4), "expects 5D input"),
    (OnlineNorm2d, (2, 4, 4, 4), "got 4 channels"),
])  # fmt: skip
def test_wrong_rank_or_channels_is_a_clear_value_error(cls, shape, message):
    with pytest.raises(ValueError, match=message):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize("kwargs, message", [
    ({"ecm": "batch"}, "ecm must be one of"),
    ({"alpha_fwd": 1.0}, "alpha_fwd must be in"),
    ({"clamp_value": 0}, "clamp_value must be positive"),
])  # fmt: skip
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineNorm2d(3, **kwargs)


def test_ecm_aliases():
    assert OnlineNorm2d(3, ecm=None).ecm == "none"
    assert OnlineNorm2d(3, ecm="layer-scaling").ecm == "layer_scaling"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = OnlineNorm2d(8, alpha_fwd=0.9)
    gpu = OnlineNorm2d(8, alpha_fwd=0.9).cuda()
    for _ in range(3):
        x = torch.randn(16, 8, 6, 6) * 2
        grad = torch.randn_like(x)
        x_cpu, x_gpu = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
        cpu(x_cpu).backward(grad)
        gpu(x_gpu).backward(grad.cuda())
        torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "u_ctrl", "v_ctrl"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ecm", ["clamp", "layer_scaling", "none"])
def test_inplace_relu_after_the_layer_trains_and_keeps_the_gradient(ecm):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    grads = []
    for inplace in (False, True):
        layer = OnlineNorm2d(3, ecm=ecm, alpha_fwd=0.9).double()
        x_in = x.clone().requires_grad_(True)
        nn.ReLU(inplace=inplace)(layer(x_in)).sum().backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["native", "scan"])
@pytest.mark.slow
def test_compiled_layer_matches_eager(path, layout):
    """Under torch.compile (TorchInductor) the layer's traced step computes what the eager layer computes,
    on either implementation: outputs, gradients and all four state buffers over two steps, in float64 (the
    compiled graph sums in its own order and precision: float32 would hide a wrong term under rounding)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1).contiguous(memory_format=memory_format)
    grad = torch.randn(8, 6, 5, 5, dtype=torch.float64)
    results = {}
    for compiled in (False, True):
        layer = OnlineNorm2d(6, alpha_fwd=0.9, clamp_value=1.5).double()
        run = torch.compile(layer, fullgraph=True) if compiled else layer
        with native_kernels(path == "native"):
            for _ in range(2):
                x_in = x.clone().requires_grad_(True)
                out = run(x_in)
                out.backward(grad)
        results[compiled] = (out.detach(), x_in.grad, layer.weight.grad, *(getattr(layer, n) for n in STATE_BUFFERS))
    for eager, compiled_result in zip(results[False], results[True]):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 2, 2)], ids=["dense", "2d"])
def test_differentiating_the_backward_again_is_an_error(shape):
    """ON's backward is a controlled process, not a derivative: a gradient penalty must fail, not count as constant."""
    layer = OnlineNorm1d(3) if len(shape) == 2 else OnlineNorm2d(3)
    x = torch.randn(shape, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)  # grad_out depends on x
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.sum().backward()


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["no-samples", "no-positions"])
def test_an_empty_input_passes_through_and_leaves_the_stream_alone(shape):
    """As BatchNorm: an empty output, and the statistics unchanged (not NaN from a mean over nothing)."""
    layer = OnlineNorm2d(3)
    before = {name: getattr(layer, name).clone() for name in STATE_BUFFERS}
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == shape and x.grad.shape == shape
    for name, value in before.items():
        assert torch.equal(getattr(layer, name), value), name
