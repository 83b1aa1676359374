"""The native kernels (``layers/native.cpp``): exact against the reference, lean, and optional.

The reference matrix of ``test_layers.py`` and the property tests already run every
layer kind on both implementations; here: the benchmark's shapes, odd layouts, what a
training step keeps for backward, and what happens where the kernels cannot be built.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch

from onorm_convert import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d
from onorm_convert.layers import STATE_BUFFERS, native, ops

from conftest import assert_matches, assert_no_worse_than_loop, layer_step, native_kernels, reference_of, reference_step

needs_compiler = pytest.mark.skipif(native.cxx_compiler() is None, reason="needs a C++ compiler")
F32_RTOL = 2e-5  # as the property tests: well above float32 roundoff times a step's operations


@pytest.fixture
def fresh_library():
    """Forget the compiler, library and backend found before and after: the test builds its own (or fails to).

    Afterwards the backend is chosen afresh on the next training step, once the test's
    environment is gone.
    """
    _forget_library()
    yield
    _forget_library()


def _forget_library():
    for cached in (native.cxx_compiler, native.library):
        cached.cache_clear()
    ops._backend = None


@needs_compiler
def test_the_kernels_are_built_and_chosen_for_every_cpu_layout():
    assert native.library() is not None
    dense, rows = torch.zeros(4, 3, 1), torch.zeros(4, 3, 2)
    channels_last = torch.zeros(4, 3, 2, 2).contiguous(memory_format=torch.channels_last).reshape(4, 3, -1)
    strided = torch.zeros(8, 3, 2)[::2]  # a view reshape keeps: copied for the kernel
    half = dense.half()  # converted to float32 for the kernel
    every_layout = (dense, dense.double(), rows, strided, channels_last, half)
    with native_kernels(True):
        assert [ops.implementation(x).name for x in every_layout] == ["native"] * len(every_layout)
    with native_kernels(False):  # ONORM_BACKEND=scans
        assert ops.implementation(dense).name == ops.implementation(rows).name == "scans"


@needs_compiler
@pytest.mark.parametrize("shape, memory_format", [
    ((256, 1024), torch.contiguous_format),
    ((8, 64, 14, 14), torch.contiguous_format),
    ((8, 64, 14, 14), torch.channels_last),
], ids=["dense", "2d", "2d-channels-last"])  # fmt: skip
def test_benchmark_shapes_match_the_reference_over_three_steps(shape, memory_format):
    """The benchmark's dense shape and a conv shape, float32, default alphas: every output, gradient and state."""
    torch.manual_seed(0)
    layer = (OnlineNorm1d if len(shape) == 2 else OnlineNorm2d)(shape[1])
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    reference = reference_of(layer)
    for step in range(3):
        x, grad_out = (torch.randn(shape) * 2 + 1).contiguous(memory_format=memory_format), torch.randn(shape)
        with native_kernels(True):
            actual = layer_step(layer, x, grad_out)
        assert_matches(actual, reference_step(reference, x, grad_out), F32_RTOL, f"step {step}")


@needs_compiler
@pytest.mark.parametrize("layout", ["transposed", "rank-3", "odd-width", "batch-1", "bfloat16", "strided-rows"])
def test_layouts_and_dtypes_match_the_reference(layout):
    """Non-contiguous input (dense, and a strided (N, C, L) view), (N, C, 1), a channel count the dense
    kernel's blocks split unevenly, one sample, bfloat16."""
    torch.manual_seed(1)
    channels = 300 if layout == "odd-width" else 5  # blocks of 256 channels: one full, one of 44
    batch = 1 if layout == "batch-1" else 40
    x = torch.randn(batch, channels) * 2 + 1
    if layout == "transposed":
        x = torch.randn(channels, batch).t() * 2 + 1
    elif layout == "rank-3":
        x = x.unsqueeze(2)
    elif layout == "bfloat16":
        x = x.bfloat16()
    elif layout == "strided-rows":  # every other sample of a longer (N, C, L) batch: a non-contiguous view
        x = (torch.randn(2 * batch, channels, 4) * 2 + 1)[::2]
    grad_out = torch.randn(x.shape).to(x.dtype)
    layer = OnlineNorm1d(channels, alpha_fwd=0.9, alpha_bkw=0.8, clamp_value=1.5)
    reference = reference_of(layer)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the blocks on two threads
    try:
        for step in range(3):
            with native_kernels(True):
                actual = layer_step(layer, x, grad_out)
            expected = reference_step(reference, x.float(), grad_out.float())
            rtol = 1e-2 if x.dtype == torch.bfloat16 else F32_RTOL  # bfloat16 outputs: 8 bits of mantissa
            assert_matches(actual, expected, rtol, f"{layout} step {step}")
    finally:
        torch.set_num_threads(threads)


@needs_compiler
@pytest.mark.parametrize("shape", [(64, 8), (64, 8, 3, 3)], ids=["dense", "2d"])
def test_a_training_step_keeps_nothing_of_the_activations_size_but_the_input(shape):
    """Backward recomputes the forward state: saved are x and four per-channel vectors, on both implementations."""
    channels = shape[1]
    saved = {}
    for native_on in (True, False):
        x = torch.randn(shape, requires_grad=True)
        with native_kernels(native_on):
            out = (OnlineNorm1d if len(shape) == 2 else OnlineNorm2d)(channels)(x)
        saved[native_on] = sum(t.numel() for t in out.grad_fn.saved_tensors)
    assert saved[True] == x.numel() + 4 * channels
    assert saved[False] == saved[True]


@needs_compiler
@pytest.mark.parametrize("native_on", [True, False], ids=["native", "scan"])
@pytest.mark.parametrize("positions", [1, 3])
def test_a_non_finite_gradient_where_the_clamp_cut_is_dropped(native_on, positions):
    """As torch.clamp's backward: a clamped output passes no gradient, not even a NaN."""
    layer = OnlineNorm1d(2, clamp_value=1.0, affine=False)
    x = torch.tensor([[0.5, 30.0], [0.2, -0.3]]).unsqueeze(2).repeat(1, 1, positions)  # sample 0, channel 1 clamped
    x[:, :, 1:] += 0.1
    grad_out = torch.ones_like(x)
    grad_out[0, 1, 0] = float("nan")
    expected = reference_step(reference_of(layer), x, grad_out)
    with native_kernels(native_on):
        actual = layer_step(layer, x, grad_out)
    assert all(torch.isfinite(t).all() for t in actual.values())
    assert_matches(actual, expected, 1e-6)


def _fake_compiler(tmp_path, stderr: str):
    compiler = tmp_path / "fake-g++"
    compiler.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    return compiler


def test_a_failing_compiler_is_reported_with_its_error(tmp_path):
    compiler = _fake_compiler(tmp_path, "native.cpp:1: error: no such thing")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    with pytest.raises(native.BuildError, match="error: no such thing"):
        native.build(str(compiler), cache)
    assert not any(cache.iterdir()), "a failed build leaves nothing in the cache"


@pytest.mark.usefixtures("fresh_library")
def test_without_the_kernel_dense_layers_warn_once_and_train_on_the_scans(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, "error: broken toolchain")))
    monkeypatch.setenv("ONORM_CACHE_DIR", str(tmp_path / "cache"))
    layer = OnlineNorm1d(3, alpha_fwd=0.9)
    reference = reference_of(layer)
    x, grad_out = torch.randn(8, 3), torch.randn(8, 3)
    with pytest.warns(UserWarning, match=r"broken toolchain.*CXX naming a working C\+\+ compiler"):
        actual = layer_step(layer, x, grad_out)
    assert native.library() is None  # decided once: no second warning, no second build
    assert_matches(actual, reference_step(reference, x, grad_out), F32_RTOL)


@needs_compiler
@pytest.mark.usefixtures("fresh_library")
def test_an_unwritable_cache_folder_is_reported(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ONORM_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
    with pytest.warns(UserWarning, match="writable ONORM_CACHE_DIR"):
        assert native.library() is None


@needs_compiler
@pytest.mark.slow
def test_a_build_is_reused_from_the_cache(tmp_path):
    compiler = native.cxx_compiler()
    first = native.build(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(compiler, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover partial builds


@needs_compiler
def test_per_channel_tensors_of_the_wrong_size_are_refused_not_overrun():
    """The kernel would read and write C values through each pointer: a short tensor must raise first."""
    short, full = torch.ones(1), torch.ones(300)
    for x in (torch.randn(4, 300, 1), torch.randn(4, 300, 5)):  # the dense and the spatial kernel
        with pytest.raises(ValueError, match=r"shape \(1,\).*300 channels"):
            native.forward(x, full, full, short, full, 0.9, 1e-5, 5.0)
        with pytest.raises(ValueError, match="300 channels"):
            native.backward(x, x, full, full, full, full, full, short, 0.9, 0.9, 1e-5, 5.0)


@needs_compiler
def test_strided_parameters_give_what_the_scans_give():
    """Weight and bias as views with stride 2 (e.g. via torch.func.functional_call) are read correctly."""
    pairs = torch.randn(5, 2)
    params = {"weight": pairs[:, 0], "bias": pairs[:, 1]}
    x, grad_out = torch.randn(6, 5), torch.randn(6, 5)
    results = []
    for native_on in (True, False):
        layer = OnlineNorm1d(5, alpha_fwd=0.9)
        x_in = x.clone().requires_grad_(True)
        with native_kernels(native_on):
            out = torch.func.functional_call(layer, params, (x_in,))
            out.backward(grad_out)
        results.append((out.detach(), x_in.grad))
    for native_result, scan_result in zip(*results):
        torch.testing.assert_close(native_result, scan_result, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("unsafe, reason", [
    ("folder writable by others", "is writable by others"),
    ("library is a link", "is a symbolic link"),
])  # fmt: skip
@pytest.mark.slow
def test_a_cache_others_could_write_is_never_loaded(tmp_path, unsafe, reason):
    """The cached library is code this process runs: refuse a folder or file someone else could have planted."""
    compiler = native.cxx_compiler()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    built = native.build(compiler, cache)
    if unsafe == "folder writable by others":
        cache.chmod(0o777)
    else:
        planted = tmp_path / "planted.so"
        built.rename(planted)
        built.symlink_to(planted)
    with pytest.raises(native.BuildError, match=f"{reason}; it may not hold code to run"):
        native.build(compiler, cache)


@pytest.mark.slow
def test_a_compiler_without_openmp_builds_once_and_then_reuses_it(tmp_path):
    """The plain build is found in the cache without retrying the OpenMP one every time."""
    real = native.cxx_compiler()
    if real is None:
        pytest.skip("needs a C++ compiler")
    log = tmp_path / "calls.log"
    compiler = tmp_path / "no-openmp-g++"
    compiler.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        f'case " $* " in *" -fopenmp "*) echo "error: unsupported option -fopenmp" >&2; exit 1;; esac\nexec {real} "$@"\n'
    )
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    first = native.build(str(compiler), cache)
    compiles = lambda: [line for line in log.read_text().splitlines() if str(native.SOURCE) in line]  # noqa: E731
    assert len(compiles()) == 1  # the OpenMP candidate failed its flag check before compiling
    assert native.build(str(compiler), cache) == first and len(compiles()) == 1


@needs_compiler
@pytest.mark.slow
def test_inside_a_compiled_model_the_layer_traces_and_agrees():
    """torch.compile of a model traces the registered ops, which keep the native kernels (the statistics and the
    control; the compiler writes the elementwise passes): the same results."""
    torch.manual_seed(0)
    x, grad_out = torch.randn(16, 8), torch.randn(16, 8)
    results = []
    for compiled in (False, True):
        layer = OnlineNorm1d(8, alpha_fwd=0.9)
        run = torch.compile(layer, backend="eager") if compiled else layer
        x_in = x.clone().requires_grad_(True)
        with native_kernels(True):
            out = run(x_in)
            out.backward(grad_out)
        results.append((out.detach(), x_in.grad, *(getattr(layer, name).clone() for name in STATE_BUFFERS)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.usefixtures("fresh_library")
def test_no_home_folder_is_a_warning_not_a_crash(monkeypatch):
    """A container user without a home (no $HOME, no passwd entry) still trains, on the scans."""
    for name in ("ONORM_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native.Path, "home", staticmethod(no_home))
    with pytest.warns(UserWarning, match="home directory"):
        assert native.library() is None


@needs_compiler
@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last_3d], ids=["rows", "channels-last"]
)
@pytest.mark.parametrize("seed", [14, 18, 23])
def test_a_stream_far_from_its_starting_mean_loses_no_precision(seed, memory_format):
    """Data at 1e-3 +- 1e-3 meeting a stream whose mean starts near N(0, 1), alpha 0.5: x - mu_prev
    is formed from mu_prev itself, so float32 is as accurate as the per-sample loop (once 40-60x worse)."""
    torch.manual_seed(seed)
    layer = OnlineNorm3d(2, alpha_fwd=0.5, alpha_bkw=0.5, eps=1e-3, clamp_value=0.5)
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.1, 3)
        layer.u_ctrl.normal_()
        layer.v_ctrl.normal_()
        layer.weight.uniform_(-1.5, 1.5)
        layer.bias.normal_()
    reference, loop = reference_of(layer), reference_of(layer, torch.float32)
    x = ((torch.randn(17, 2, 3, 3, 3, dtype=torch.float64) + 1) * 1e-3).float().contiguous(memory_format=memory_format)
    grad_out = torch.randn(x.shape)
    with native_kernels(True):
        actual = layer_step(layer, x, grad_out)
    expected = reference_step(reference, x, grad_out)
    assert_no_worse_than_loop(actual, expected, reference_step(loop, x, grad_out), 10, 1e-6, f"seed {seed}")


@needs_compiler
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["rows", "channels-last"])
def test_data_far_from_the_stream_mean_keeps_float64_precision(memory_format):
    """alpha_fwd = 0 (the variance is the sample's own), data at 1000 +- 1e-3 against a stream at 0: the
    moments are taken around the sample itself, so float64 stays exact (around 0 they lost 6 digits)."""
    torch.manual_seed(0)
    layer = OnlineNorm2d(8, alpha_fwd=0.0).double()
    reference = reference_of(layer)
    x = (torch.randn(4, 8, 16, 16, dtype=torch.float64) * 1e-3 + 1000).contiguous(memory_format=memory_format)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    with native_kernels(True):
        actual = layer_step(layer, x, grad_out)
    assert_matches(actual, reference_step(reference, x, grad_out), 1e-8)


@needs_compiler
@pytest.mark.slow
def test_a_new_build_prunes_month_old_builds_and_partial_files_only(tmp_path):
    """Old builds (earlier onorm versions) and leftovers of killed builds go; recent ones and strangers stay."""
    old, recent = time.time() - native.STALE_SECONDS - 60, time.time() - 60
    files = {
        "onorm_native_0123456789abcdef0123.so": old,  # an old version's build
        ".build-killed.so": old,  # a killed build's leftover
        "onorm_native_fedcba9876543210fedc.so": recent,  # another version, in use
        "notes.txt": old,  # not ours
    }
    for name, stamp in files.items():
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (stamp, stamp))
    built = native.build(native.cxx_compiler(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [built.name, "onorm_native_fedcba9876543210fedc.so", "notes.txt"]
    )
