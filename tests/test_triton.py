"""The Triton kernels (``layers/triton_kernels.py``) against the per-sample reference and the scans.

Without a CUDA device they run under Triton's interpreter, on CPU tensors. ``TRITON_INTERPRET``
is read when triton is imported (its own library is ``@triton.jit`` functions too) and when
the kernels' module is: so this module sets it, process-wide, before importing either.
Collection imports every test module before any test runs, and none collected earlier imports
triton; nothing else reads the variable (torch reads it only for Triton kernels of its own,
which its CPU compiler never generates). With a CUDA device the same tests run the compiled
kernels on CUDA tensors, and those marked ``cuda`` add ResNet-50 shapes. The reference runs
on the CPU in float64 in both cases.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onorm_convert import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d
from onorm_convert.layers import functional, ops

from conftest import assert_matches, assert_no_worse_than_loop, layer_step, reference_of, reference_step

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("triton was imported before this module could set TRITON_INTERPRET=1", pytrace=False)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="needs triton (pip install triton==3.9.0; make setup installs it)")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_cuda = pytest.mark.skipif(INTERPRETED, reason="needs a CUDA device (and TRITON_INTERPRET unset)")
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CLASSES = {2: OnlineNorm1d, 3: OnlineNorm1d, 4: OnlineNorm2d, 5: OnlineNorm3d}
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.fixture(scope="module")
def kernels():
    """The kernels' module: interpreted where there is no CUDA device."""
    module = importlib.import_module("onorm_convert.layers.triton_kernels")
    assert module.INTERPRETED == INTERPRETED, "the kernels' module was imported before TRITON_INTERPRET was set"
    return module


@pytest.fixture
def triton_backend(kernels):
    """``ONORM_BACKEND=triton`` for one test: this module's device takes the Triton kernels."""
    previous = ops.backend()
    ops.set_backend("triton")
    assert ops.implementation(torch.empty(0, device=DEVICE)).name == "triton"
    yield kernels
    ops.set_backend(previous)


def _layer(shape, dtype=torch.float32, **settings):
    """A layer for ``shape`` on this module's device, with a used state and a random affine."""
    layer = CLASSES[len(shape)](shape[1], alpha_fwd=0.9, alpha_bkw=0.8, **{"clamp_value": 1.5, **settings})
    with torch.no_grad():
        layer.running_mean.normal_(std=0.5)
        layer.running_var.uniform_(0.5, 2.0)
        layer.u_ctrl.normal_(std=0.1)
        layer.v_ctrl.normal_(std=0.1)
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return layer.to(device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _reference(layer):
    """The per-sample reference (float64, CPU) of ``layer``, its settings included."""
    return reference_of(copy.deepcopy(layer).cpu())


def _batch(shape, dtype, channels_last=False):
    """``(x, grad_out)`` on this module's device: data at 1 +- 2 (the clamp at 1.5 cuts), channels_last if asked."""
    memory_format = FORMATS[len(shape)] if channels_last else torch.contiguous_format
    x = (torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    return x.to(DEVICE), torch.randn(shape).to(dtype).to(DEVICE)


def _steps_match_the_reference(layer, shape, dtype, channels_last=False, steps=3):
    """``steps`` training steps of ``layer`` (state carried over) against the reference on the same inputs, upcast."""
    reference = _reference(layer)
    for step in range(steps):
        x, grad_out = _batch(shape, dtype, channels_last)
        actual = {name: t.cpu() for name, t in layer_step(layer, x, grad_out).items()}
        assert actual["out"].dtype == actual["grad_x"].dtype == dtype
        if layer.ecm == "clamp":
            assert (actual["out"].abs() == layer.clamp_value).any(), "the clamp should cut somewhere"
        expected = reference_step(reference, x.cpu().double(), grad_out.cpu().double())
        assert_matches(actual, expected, RTOL[dtype], f"step {step}")


CASES = {  # shape, channels_last, layer settings
    "dense": ((12, 5), False, {}),
    "dense-batch-1": ((1, 5), False, {}),
    "dense-wide": ((3, 130), False, {"control": "stable"}),  # two programs of the scan (128 channels)
    "1d": ((6, 3, 7), False, {"control": "stable"}),
    "2d": ((5, 3, 4, 4), False, {}),
    "2d-channels-last": ((5, 3, 4, 4), True, {"control": "stable"}),
    "2d-batch-1": ((1, 3, 4, 4), True, {}),
    "3d-channels-last": ((3, 2, 2, 3, 3), True, {}),
    "no-clamp": ((4, 3, 3, 3), True, {"ecm": "none"}),  # limit = inf
    "plain": ((4, 3, 5), False, {"affine": False}),
    "dense-projected": ((12, 5), False, {"projection": "batch"}),
    "2d-projected": ((5, 3, 4, 4), False, {"control": "stable", "projection": "batch"}),
    "2d-channels-last-projected": ((5, 3, 4, 4), True, {"projection": "batch"}),
}


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_match_the_per_sample_reference(case, dtype):
    torch.manual_seed(len(case))
    shape, channels_last, settings = CASES[case]
    _steps_match_the_reference(_layer(shape, dtype, **settings), shape, dtype, channels_last)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("shape", [
    (150, 3),  # a batch longer than the scans' channel block (128)
    pytest.param((1100, 2), marks=pytest.mark.slow, id="batch-1100"),  # longer than every block (1024 positions)
    (2, 70, 3, 3),  # channels_last: two channel blocks of 64
    (2, 2, 1100),  # positions: two steps of 1024, merged
])  # fmt: skip
def test_shapes_beyond_one_block_match_the_reference(shape):
    """One step (the matrix above carries the state over steps): the interpreter walks a long batch slowly."""
    torch.manual_seed(3)
    _steps_match_the_reference(_layer(shape), shape, torch.float32, channels_last=len(shape) == 4, steps=1)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(8, 4), (4, 3, 4, 4)], ids=["dense", "2d-channels-last"])
def test_half_precision_activations_match_the_reference_on_their_float_values(shape, dtype):
    """Read in their own dtype, computed on in float32: the reference on the same values upcast, within
    half precision's rounding of the outputs and input gradient; the state stays float32."""
    torch.manual_seed(5)
    layer = _layer(shape)
    _steps_match_the_reference(layer, shape, dtype, channels_last=len(shape) == 4)
    assert layer.running_mean.dtype == layer.u_ctrl.dtype == torch.float32


@pytest.mark.usefixtures("triton_backend")
def test_layer_scaling_of_bfloat16_activations_takes_z_in_float32():
    """Layer scaling wants z in the statistics dtype: the activations are converted first, as for the scans."""
    torch.manual_seed(6)
    layer = _layer((4, 3, 5), ecm="layer_scaling")
    reference = _reference(layer)
    x, grad_out = _batch((4, 3, 5), torch.bfloat16)
    actual = {name: t.cpu() for name, t in layer_step(layer, x, grad_out).items()}
    expected = reference_step(reference, x.cpu().double(), grad_out.cpu().double())
    assert_matches(actual, expected, RTOL[torch.bfloat16])


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("shape", [(2, 2, 1), (2, 2, 3)], ids=["dense", "positions"])
def test_a_non_finite_gradient_where_the_clamp_cut_is_dropped(shape):
    layer = OnlineNorm1d(2, clamp_value=1.0, affine=False).to(DEVICE)
    x = torch.tensor([[0.5, 30.0], [0.2, -0.3]]).unsqueeze(2).repeat(1, 1, shape[2])  # sample 0, channel 1 clamped
    x[:, :, 1:] += 0.1
    grad_out = torch.ones_like(x)
    grad_out[0, 1, 0] = float("nan")
    expected = reference_step(_reference(layer), x, grad_out)
    actual = {name: t.cpu() for name, t in layer_step(layer, x.to(DEVICE), grad_out.to(DEVICE)).items()}
    assert all(torch.isfinite(t).all() for t in actual.values())
    assert_matches(actual, expected, 1e-6)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d], ids=["rows", "cl"])
def test_a_stream_far_from_its_starting_mean_loses_no_precision(memory_format):
    """As for the native kernels (test_native.py): data at 1e-3 +- 1e-3 meeting a stream whose mean starts near
    N(0, 1), float32: x - mu_prev is formed from mu_prev itself, as accurate as the per-sample loop in float32."""
    torch.manual_seed(14)
    layer = OnlineNorm3d(2, alpha_fwd=0.5, alpha_bkw=0.5, eps=1e-3, clamp_value=0.5)
    with torch.no_grad():
        for buffer in (layer.running_mean, layer.u_ctrl, layer.v_ctrl, layer.bias):
            buffer.normal_()
        layer.running_var.uniform_(0.1, 3)
        layer.weight.uniform_(-1.5, 1.5)
    layer = layer.to(DEVICE)
    reference, loop = _reference(layer), reference_of(copy.deepcopy(layer).cpu(), torch.float32)
    x = ((torch.randn(17, 2, 3, 3, 3, dtype=torch.float64) + 1) * 1e-3).float().contiguous(memory_format=memory_format)
    grad_out = torch.randn(x.shape)
    actual = {name: t.cpu() for name, t in layer_step(layer, x.to(DEVICE), grad_out.to(DEVICE)).items()}
    expected = reference_step(reference, x, grad_out)
    assert_no_worse_than_loop(actual, expected, reference_step(loop, x, grad_out), 10, 1e-6)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["rows", "cl"])
def test_data_far_from_the_stream_mean_keeps_float64_precision(memory_format):
    """alpha_fwd = 0, data at 1000 +- 1e-3 against a stream at 0: every step of positions is centered on its
    own mean, so float64 stays exact."""
    torch.manual_seed(0)
    layer = OnlineNorm2d(8, alpha_fwd=0.0).double().to(DEVICE)
    reference = _reference(layer)
    x = (torch.randn(3, 8, 6, 6, dtype=torch.float64) * 1e-3 + 1000).contiguous(memory_format=memory_format)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    actual = {name: t.cpu() for name, t in layer_step(layer, x.to(DEVICE), grad_out.to(DEVICE)).items()}
    assert_matches(actual, reference_step(reference, x, grad_out), 1e-8)


def _kernel_inputs(shape, dtype, layout):
    """Arguments of ``forward``/``backward`` for ``(N, C, S)`` activations in ``layout``, and a used state."""
    n, channels, positions = shape
    x = torch.randn(n, channels, positions, dtype=dtype) * 2 + 1
    if layout == "channels-last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":  # every other sample of a longer batch, a view
        x = (torch.randn(2 * n, channels, positions, dtype=dtype) * 2 + 1)[::2]
    g = torch.randn(n, channels, positions, dtype=dtype)  # contiguous whatever x's layout is
    mean0, gamma, offset, u0, v0 = (torch.randn(channels, dtype=dtype) * 0.5 for _ in range(5))
    var0 = torch.rand(channels, dtype=dtype) + 0.5
    return x.to(DEVICE), g.to(DEVICE), *(t.to(DEVICE) for t in (mean0, var0, gamma, offset, u0, v0))


@pytest.mark.parametrize("limit", [1.5, math.inf], ids=["clamp", "no-clamp"])
@pytest.mark.parametrize("stable", [False, True], ids=["exact", "stable"])
@pytest.mark.parametrize("shape, layout", [
    ((7, 3, 1), "contiguous"),
    ((7, 3, 1), "strided"),
    ((5, 3, 6), "contiguous"),
    ((5, 3, 6), "channels-last"),
    ((5, 3, 6), "strided"),
])  # fmt: skip
def test_the_kernels_give_what_the_scans_give(kernels, shape, layout, stable, limit):
    """float64, so that the two differ only by rounding: every output of forward and backward; and the
    outputs keep the activations' layout."""
    torch.manual_seed(7)
    x3, g3, mean0, var0, gamma, offset, u0, v0 = _kernel_inputs(shape, torch.float64, layout)
    settings = (0.9, 1e-5, limit)
    z, *forward_state = kernels.forward(x3, mean0, var0, gamma, offset, *settings)
    grads = kernels.backward(g3, x3, mean0, var0, gamma, offset, u0, v0, 0.9, 0.8, 1e-5, limit, stable)
    cpu = [t.cpu() for t in (g3, x3, mean0, var0, gamma, offset, u0, v0)]
    expected_forward = functional.scan_forward(cpu[1], *cpu[2:6], *settings)
    expected_backward = functional.scan_backward(*cpu, 0.9, 0.8, 1e-5, limit, stable)
    for name, actual, expected in zip(
        ["z", "mean_last", "var_last", "grad_x", "grad_weight", "grad_bias", "u_last", "v_last"],
        [z, *forward_state, *grads],
        [*expected_forward, *expected_backward],
    ):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    if layout == "channels-last":
        assert z.stride() == grads[0].stride() == x3.stride()


def test_per_channel_tensors_of_the_wrong_size_are_refused_not_overrun(kernels):
    short, full = torch.ones(1, device=DEVICE), torch.ones(300, device=DEVICE)
    x = torch.randn(4, 300, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"shape \(1,\).*300 channels"):
        kernels.forward(x, full, full, short, full, 0.9, 1e-5, 5.0)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("shape, dtype, memory_format", [
    ((6, 4), torch.float32, torch.contiguous_format),
    ((5, 3, 4, 4), torch.bfloat16, torch.channels_last),
])  # fmt: skip
def test_the_traced_ops_pass_opcheck_beside_the_triton_kernels(shape, dtype, memory_format):
    """Under ONORM_BACKEND=triton the traced ops (the scans' statistics and control) promise what they return
    (float32 statistics of half-precision activations), eager and under AOT dispatch."""
    torch.manual_seed(8)
    channels = shape[1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format).to(DEVICE)
    mean, u, v = (torch.randn(channels, device=DEVICE) * 0.1 for _ in range(3))
    var = torch.rand(channels, device=DEVICE) + 0.5
    alpha_now = torch.tensor(0.95, device=DEVICE)  # an adaptive layer's
    settings = (0.9, 1.0, 1e-5, "exact", "batch", "l")  # alpha_bkw = 1: repeated backwards agree (see test_ops)
    torch.library.opcheck(ops.train_statistics, (x.requires_grad_(True), mean, var, u, v, alpha_now, *settings))
    center, inv_k, d, s, _, _ = ops.train_statistics(x.detach(), mean, var, u, v, alpha_now, *settings)
    sums = (torch.randn_like(d), torch.randn_like(d))
    control_args = (*sums, center, inv_k, d, s, u, v, 0.8, 1e-5, x[0, 0].numel(), "exact", True, "l")
    torch.library.opcheck(ops.train_control, control_args)


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_a_gpu():
    """Without a GPU: each launch the cases make, compiled by Triton down to an sm_90 cubin (the interpreter
    above does not type-check as the compiler does)."""
    script = Path(__file__).with_name("triton_compile.py")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # the kernels ask for no fusion themselves; this silences the 3.9 notice
    done = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = {line.split()[1] for line in done.stdout.splitlines()}
    assert compiled == {
        "_moments_kernel", "_forward_scan_kernel", "_normalize_kernel", "_grad_sums_kernel",
        "_backward_scan_kernel", "_input_grad_kernel", "_dense_forward_kernel", "_dense_backward_kernel",
    }  # fmt: skip


# ---- CUDA only: ResNet-50 layer shapes against the float64 reference --------------------------


@needs_cuda
@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (32, 256, 28, 28), (32, 2048, 7, 7), (256, 1024)])
def test_resnet50_shapes_on_cuda_match_the_float64_reference(shape, dtype):
    torch.manual_seed(9)
    _steps_match_the_reference(_layer(shape), shape, dtype, channels_last=len(shape) == 4, steps=2)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend")
def test_cuda_tensors_under_autocast_train_on_the_kernels():
    """bf16 autocast, channels_last, as a train step runs it: outputs in bf16, state in float32, all finite."""
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), OnlineNorm2d(8)).to(DEVICE)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 12, 12, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    norm = model[1]
    assert out.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in (out, norm.running_var, norm.u_ctrl, norm.v_ctrl, norm.weight.grad))
