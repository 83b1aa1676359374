"""Helpers shared by the layer tests: mirror a layer in the per-sample reference and compare steps.

Imported by test modules as ``from conftest import ...`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from onorm_convert.cli import app
from onorm_convert.layers import STATE_BUFFERS, native, online_norm, ops

from reference import ReferenceOnlineNorm


@pytest.fixture(scope="session", autouse=True)
def private_kernel_cache(tmp_path_factory):
    """Each test session builds the native kernels afresh in its own cache folder, as on a new machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONORM_CACHE_DIR", str(tmp_path_factory.mktemp("onorm-kernel-cache")))
        native.library.cache_clear()
        yield
    native.library.cache_clear()


REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
MLP, MLP_ARCH = SAMPLES / "digits_mlp.pt", "sample_models.models:digits_mlp"
RESNET, RESNET_ARCH = SAMPLES / "digits_resnet.pt", "sample_models.models:digits_resnet"
_runner = CliRunner()


def onorm(*args: object) -> Result:
    """Run the ``onorm`` CLI in this process (arguments str()-ed); stdout and stderr apart."""
    return _runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, so `--arch sample_models.models:...` imports as a user's would."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session", autouse=True)
def private_signing_key(tmp_path_factory):
    """Each test session signs checkpoints with its own key, never the user's (onorm_convert.trust)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONORM_CONFIG_DIR", str(tmp_path_factory.mktemp("onorm-config")))
        yield


@pytest.fixture(scope="module")
def eager_kernels():
    """The best available implementation (``ONORM_BACKEND`` unset) for a whole module, whatever ran before.

    For tests over many shapes and layouts: every CPU layout takes the native kernels,
    built once per session (the scans where no C++ compiler is present).
    """
    previous = ops.backend()
    ops.set_backend(None)
    yield
    ops.set_backend(previous)


@contextlib.contextmanager
def native_kernels(enabled: bool):
    """Layers on the native kernels (``ONORM_BACKEND=native``) or on the scans (``scans``).

    Where no C++ compiler is present the native cases run on the scans. Where one is, the
    kernels must be there: a failed build may not silently turn the native cases into scan cases.
    """
    if enabled and native.cxx_compiler():
        assert native.library() is not None, "the native kernels did not build"
    previous = ops.backend()
    ops.set_backend(ops.NATIVE if enabled and native.library() is not None else ops.SCANS)
    try:
        yield
    finally:
        ops.set_backend(previous)


# How a layer's training step runs: the fused passes of the native kernels or of the scans (eager), or the step
# torch.compile and torch.export trace (ops.traced_step: the registered ops and the elementwise ops between them),
# run eagerly on the native kernels' statistics and control.
TRAINING_PATHS = ("native", "scan", "traced")


@contextlib.contextmanager
def training_path(path: str):
    """Layers train by ``path`` (one of :data:`TRAINING_PATHS`; see :func:`native_kernels` for the first two)."""
    with native_kernels(path != "scan"), pytest.MonkeyPatch.context() as patch:
        if path == "traced":
            patch.setattr(online_norm, "train_step", ops.traced_step)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads cost more than they bring (and other tests share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_of(layer, dtype=torch.float64) -> ReferenceOnlineNorm:
    """A per-sample reference computing in ``dtype``, holding a copy of ``layer``'s state, parameters and settings."""

    def cast(t):
        return None if t is None else t.detach().to(dtype, copy=True)

    return ReferenceOnlineNorm(
        cast(layer.running_mean), cast(layer.running_var), cast(layer.u_ctrl), cast(layer.v_ctrl),
        cast(layer.weight), cast(layer.bias), layer.alpha_fwd, layer.alpha_bkw, layer.eps,
        layer.ecm, layer.clamp_value, layer.ls_eps, layer.control, layer.projection,
    )  # fmt: skip


def layer_step(layer, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training forward + backward of ``layer`` on ``x``; returns outputs, gradients and the new state.

    Keys: ``out, grad_x, grad_weight, grad_bias`` (the last two only with affine), then
    ``running_mean, running_var, u_ctrl, v_ctrl`` after the step.
    """
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(grad_out)
    result = {"out": out.detach(), "grad_x": x.grad}
    if layer.affine:
        result.update(grad_weight=layer.weight.grad, grad_bias=layer.bias.grad)
    result.update(state_of(layer))
    return result


def state_of(layer) -> dict[str, torch.Tensor]:
    """Copies of the layer's four state buffers, by buffer name."""
    return {name: getattr(layer, name).detach().clone() for name in STATE_BUFFERS}


def reference_step(reference: ReferenceOnlineNorm, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """One reference step on the same values, in the reference's dtype; same keys as :func:`layer_step`."""
    dtype = reference.mu.dtype
    out, grad_x, grad_w, grad_b = reference.train_step(x.detach().to(dtype), grad_out.to(dtype))
    result = {"out": out, "grad_x": grad_x}
    if grad_w is not None:
        result.update(grad_weight=grad_w, grad_bias=grad_b)
    result.update(running_mean=reference.mu, running_var=reference.var, u_ctrl=reference.u, v_ctrl=reference.v)
    return result


# Quantities smaller than this in norm (a gradient that is all cancellation, a mean near 0)
# are judged by their absolute error scaled by it, not by their own size.
SCALE_FLOOR = 1e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max(max|expected|, SCALE_FLOOR)``, computed in float64."""
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / max(expected.double().abs().max().item(), SCALE_FLOOR)


def assert_matches(actual: dict, expected: dict, rtol: float, context: str = "") -> None:
    """Every quantity of ``actual`` within ``rtol`` (norm-wise, see :func:`relative_error`) of ``expected``."""
    assert actual.keys() == expected.keys()
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= rtol}
    assert not bad, f"{context}: relative error above {rtol:.0e}: {bad}"


def assert_no_worse_than_loop(actual: dict, expected: dict, loop: dict, factor: float, floor: float, context=""):
    """Each quantity's error at most ``factor`` times that of the per-sample ``loop`` in the same dtype, or ``floor``.

    Some settings make the recurrences ill-conditioned (a backward decay
    ``1 - (1 - alpha_bkw) * mean(y^2)`` far below -1 amplifies every rounding error);
    there no implementation in that dtype can do better than the plain sequential loop.
    """
    bad = {}
    for name in expected:
        allowed = max(factor * relative_error(loop[name], expected[name]), floor)
        error = relative_error(actual[name], expected[name])
        if not error <= allowed:
            bad[name] = f"{error:.2e} > {allowed:.2e}"
    assert not bad, f"{context}: {bad}"
