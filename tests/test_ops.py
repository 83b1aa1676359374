"""The registered ops (``layers/ops.py``): their registrations and implementations, the ONORM_BACKEND switch, and
whole converted models under torch.compile and torch.export."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, convert
from onorm_convert.layers import STATE_BUFFERS, native, online_norm, ops

from conftest import native_kernels

BACKENDS = ["native", "scan"]
SETTINGS = {  # alpha_now (an adaptive layer's, else None), alpha_fwd, alpha_bkw, eps, clamp_value, clamp_mode, control,
    # projection
    "clamp": (None, 0.9, 0.8, 1e-5, 1.5, "fixed", "exact", "none"),
    "affine-clamp-stable": (None, 0.9, 0.8, 1e-5, 0.7, "affine", "stable", "none"),
    "no-clamp": (None, 0.5, 0.8, 1e-3, None, "fixed", "exact", "none"),
    "adaptive-alpha": (0.95, 0.9, 0.8, 1e-5, 1.5, "affine", "stable", "none"),
    "convert-defaults": (0.99, 0.99, 0.9, 1e-5, 5.0, "affine", "stable", "batch"),
}
CASES = {  # activations' shape, memory format, dtype
    "dense": ((6, 4), torch.contiguous_format, torch.float32),
    "2d": ((5, 3, 4, 4), torch.contiguous_format, torch.float64),
    "2d-channels-last": ((5, 3, 4, 4), torch.channels_last, torch.float32),
    "1d": ((5, 3, 7), torch.contiguous_format, torch.float32),
}


def _statistics_args(case, settings, alpha_bkw=None):
    """Arguments of ``onorm::train_statistics`` for one case: x requiring grad, a used state."""
    shape, memory_format, dtype = CASES[case]
    alpha_now, alpha_fwd, default_bkw, eps, _, _, control, projection = SETTINGS[settings]
    channels = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).contiguous(memory_format=memory_format).requires_grad_(True)
    mean, u, v = (torch.randn(channels, dtype=dtype) * 0.1 for _ in range(3))
    var = torch.rand(channels, dtype=dtype) + 0.5
    alpha_bkw = default_bkw if alpha_bkw is None else alpha_bkw
    alpha_now = None if alpha_now is None else torch.tensor(alpha_now, dtype=dtype)
    return x, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, control, projection, "layer"


def _control_args(case, settings):
    """Arguments of ``onorm::train_control``: the per-sample statistics of a case's batch, and random sums."""
    x, mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps, control, projection, name = _statistics_args(
        case, settings
    )
    center, inv_k, d, s, _, _ = ops.train_statistics(x.detach(), mean, var, u, v, alpha_now, alpha_fwd, alpha_bkw, eps,
                                                     control, projection, name)  # fmt: skip
    sum_g, sum_g_xc = torch.randn_like(d), torch.randn_like(d)
    project = projection == "batch"
    return sum_g, sum_g_xc, center, inv_k, d, s, u, v, alpha_bkw, eps, x[0, 0].numel(), control, project, name


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", BACKENDS)
def test_the_statistics_op_passes_opcheck(path, case, settings):
    torch.manual_seed(0)
    with native_kernels(path == "native"):
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(ops.train_statistics, _statistics_args(case, settings), test_utils=checks)
        # opcheck runs eager and compiled backward on the same u, v, which each advances: with
        # alpha_bkw = 1 they do not feed back into the gradients, so both runs must agree.
        torch.library.opcheck(ops.train_statistics, _statistics_args(case, settings, alpha_bkw=1.0),
                              test_utils="test_aot_dispatch_dynamic")  # fmt: skip


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", BACKENDS)
def test_the_control_op_passes_opcheck(path, case, settings):
    torch.manual_seed(0)
    with native_kernels(path == "native"):
        torch.library.opcheck(ops.train_control, _control_args(case, settings))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("settings", ["clamp", "affine-clamp-stable"])
def test_the_native_statistics_and_control_are_the_scans(case, settings):
    """The traced ops' two implementations agree (float64 cases to rounding, float32 to its precision)."""
    torch.manual_seed(3)
    args = _statistics_args(case, settings)
    control_args = _control_args(case, settings)
    results = {}
    for path in BACKENDS:
        with native_kernels(path == "native"):
            assert ops.implementation(args[0]).name == ("native" if path == "native" else "scans")
            x = args[0].detach()
            results[path] = (*ops.train_statistics(x, *args[1:]), *ops.train_control(*control_args))
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if args[0].dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for native_result, scan_result in zip(results["native"], results["scan"]):
        torch.testing.assert_close(native_result, scan_result, **tolerance)


def test_differentiating_the_traced_backward_is_an_error(monkeypatch):
    monkeypatch.setattr(online_norm, "train_step", ops.traced_step)
    layer = OnlineNorm2d(3)
    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)  # grad_out depends on x
    with pytest.raises(RuntimeError, match="train_control cannot be differentiated"):
        grad_x.sum().backward()


@pytest.fixture
def unresolved_backend(monkeypatch):
    """The backend not chosen yet, as in a fresh process; the choice before restored afterwards."""
    monkeypatch.setattr(ops, "_backend", None)
    monkeypatch.delenv("ONORM_BACKEND", raising=False)


@pytest.mark.usefixtures("unresolved_backend")
def test_onorm_backend_is_read_once(monkeypatch):
    monkeypatch.setenv("ONORM_BACKEND", "scans")
    assert ops.backend() == "scans"
    monkeypatch.setenv("ONORM_BACKEND", "no-such-thing")
    assert ops.backend() == "scans"


@pytest.mark.usefixtures("unresolved_backend")
def test_unset_onorm_backend_takes_the_best_available_for_each_device():
    assert ops.backend() == "auto"
    assert ops.implementation(torch.zeros(2, 3)).name == ("native" if native.library() is not None else "scans")
    assert ops.implementation(torch.zeros(2, 3, device="meta")).name == "scans"  # no kernels for other devices
    if torch.cuda.is_available():
        cuda = ops.implementation(torch.zeros(2, 3, device="cuda")).name
        assert cuda == ("triton" if importlib.util.find_spec("triton") else "scans")


@pytest.mark.usefixtures("unresolved_backend")
@pytest.mark.parametrize("case, message", [
    ("no-triton", "ONORM_BACKEND=triton: the Triton kernels cannot run here: triton does not import.*pip install triton"),
    ("no-device", "ONORM_BACKEND=triton: the Triton kernels cannot run here: no CUDA device, and TRITON_INTERPRET=1"),
    ("unknown", "ONORM_BACKEND must be one of native, scans, triton or auto.*got 'cuda'"),
])  # fmt: skip
def test_an_unavailable_backend_is_an_error_not_a_fallback(monkeypatch, case, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if case == "no-triton":
        monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    elif case == "no-device" and (torch.cuda.is_available() or importlib.util.find_spec("triton") is None):
        pytest.skip("needs triton installed and no CUDA device")
    setting = "cuda" if case == "unknown" else "triton"
    monkeypatch.setenv("ONORM_BACKEND", setting)
    layer = OnlineNorm1d(3)
    with pytest.raises(ops.BackendError, match=message):
        layer(torch.randn(4, 3))
    assert torch.equal(layer.running_mean, torch.zeros(3))


@pytest.mark.usefixtures("unresolved_backend")
def test_native_without_the_kernels_is_an_error(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "cxx_compiler", lambda: None)
    with pytest.raises(ops.BackendError, match=r"native kernels are unavailable here \(no C\+\+ compiler"):
        ops.set_backend("native")


@pytest.mark.parametrize("step", ["eager", "traced"])
def test_a_training_step_looks_up_nothing_in_the_environment_or_the_file_system(monkeypatch, step):
    """No compiler discovery, file checks, cache lookups or environment reads per call: they were done once.

    ``traced``: the registered ops and the elementwise step a compiled model runs, called eagerly.
    """
    if step == "traced":
        monkeypatch.setattr(online_norm, "train_step", ops.traced_step)
    layer = OnlineNorm2d(3, alpha_mode="adaptive", clamp_mode="affine", projection="batch")
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer(x).sum().backward()  # the first step chooses the backend (and builds the kernels)

    def asked_again():
        raise AssertionError("asked for the compiler or library again")

    # Cached answers, looked up through functools.cache: C code, which the profile hook does not see.
    monkeypatch.setattr(native, "library", asked_again)
    monkeypatch.setattr(native, "cxx_compiler", asked_again)
    calls = []

    def record(frame, event, arg):
        if event == "c_call":  # a builtin, or a C wrapper such as functools.cache's
            calls.append(f"{type(arg).__name__}:{getattr(arg, '__module__', None)}.{getattr(arg, '__qualname__', arg)}")
        elif event == "call":
            calls.append(f"function:{frame.f_globals.get('__name__')}.{frame.f_code.co_qualname}")

    sys.setprofile(record)
    try:
        for _ in range(2):
            layer(x).sum().backward()
    finally:
        sys.setprofile(None)
    forbidden = ("shutil.which", "posix.stat", "posix.lstat", "_Environ.", "os.getenv")
    assert calls, "the profile hook saw nothing"
    looked_up = sorted({call for call in calls if any(name in call for name in forbidden)})
    assert not looked_up, looked_up


def _small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4),
    )  # fmt: skip


def _train(model: nn.Module, run, batches) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, target in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(run(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("path", BACKENDS)
def test_a_converted_model_trains_under_torch_compile_as_in_eager(path):
    """fullgraph=True (no graph break), TorchInductor on CPU: the same losses, parameters and state over 3 steps
    (float64: the compiled graph sums in its own order, which float32 rounding would blur)."""
    model = convert(_small_convnet().double(), alpha_fwd=0.9, alpha_bkw=0.8)
    twin = copy.deepcopy(model)
    batches = [(torch.randn(8, 3, 6, 6, dtype=torch.float64) * 2 + 1, torch.randint(0, 4, (8,))) for _ in range(3)]
    with native_kernels(path == "native"):
        eager_losses = _train(model, model, batches)
        compiled_losses = _train(twin, torch.compile(twin, fullgraph=True), batches)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-10)
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    actual = dict(twin.named_parameters()) | dict(twin.named_buffers())
    assert actual.keys() == expected.keys()
    assert sum(name.endswith(STATE_BUFFERS) for name in actual) == 4 * 3  # every state buffer of 3 layers compared
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_a_compiled_model_follows_eager_as_the_batch_size_changes():
    """dynamic=True, batches of 8, 5, 1 and 7 (the projection is off at 1): the same gradients and state, float64."""
    torch.manual_seed(0)
    model = convert(_small_convnet().double())
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, dynamic=True)
    for size in (8, 5, 1, 7):
        x = torch.randn(size, 3, 6, 6, dtype=torch.float64)
        for run in (model, compiled):
            run(x).square().sum().backward()
    expected = model.state_dict() | {f"{name}.grad": p.grad for name, p in model.named_parameters()}
    actual = twin.state_dict() | {f"{name}.grad": p.grad for name, p in twin.named_parameters()}
    assert sum(name.endswith(STATE_BUFFERS) for name in actual) == 4 * 3
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_converted_model_exports(mode):
    model = convert(_small_convnet(), clamp_mode="affine")
    model.train(mode == "train")
    x = torch.randn(4, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert ("onorm.train_statistics.default" in targets) == (mode == "train")
    assert exported.module()(x).shape == (4, 4)


def test_an_adaptive_layers_alpha_now_is_the_decay_the_ops_use():
    torch.manual_seed(0)
    x, mean, var, u, v, alpha_now, _, *rest = _statistics_args("2d", "adaptive-alpha")
    adaptive = ops.train_statistics(x, mean, var, u, v, alpha_now, 0.5, *rest)
    fixed = ops.train_statistics(x, mean, var, u, v, None, float(alpha_now), *rest)
    other = ops.train_statistics(x, mean, var, u, v, None, 0.5, *rest)
    for ours, theirs in zip(adaptive, fixed):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(adaptive[4], other[4])  # the settings' alpha_fwd is not what it used
