"""The dense training passes as native code: ``dense_kernel.cpp``, built once per machine.

For ``(N, C)`` activations every per-sample statistic is as large as the activations, so
the batch-parallel scans of :mod:`.functional` write and re-read several ``(N, C)``
tensors and save three of them for backward. The C++ kernel instead walks the stream
once per pass, vectorized across channels, and recomputes the forward state in backward:
a training step then stores nothing of the activations' size besides the input.

The library is compiled with the C++ compiler TorchInductor uses (``$CXX``, default
``g++``), like Inductor's own kernels, and cached under ``$ONORM_CACHE_DIR`` (default
``~/.cache/onorm``) keyed by source, flags and CPU. Where that fails the layer keeps the
scan implementation (one warning says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("dense_kernel.cpp")
# -ffp-contract=off: forward and backward compute z alike (backward recomputes the clamp mask).
# -fno-trapping-math: lets the compiler vectorize the clamp mask's select.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)  # dropped, single-threaded, where the compiler lacks OpenMP (Apple clang)
_TYPES = {torch.float32: "f32", torch.float64: "f64"}
_P, _N, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_SIGNATURES = {
    "onorm_dense_forward": [_P, _P, _N, _N, _P, _P, _P, _P, _F, _F, _F, _P, _P, ctypes.c_int],
    "onorm_dense_backward": [_P, _P, _P, _N, _N, _P, _P, _P, _P, _F, _F, _F, _F, _P, _P, _P, _P, ctypes.c_int],
}


def supports(x: Tensor) -> bool:
    """Whether the native kernel can run activations like ``x``: CPU, float32 or float64."""
    return x.device.type == "cpu" and x.dtype in _TYPES and dense_library() is not None


def dense_forward(x, mean0, var0, gamma, offset, alpha_fwd: float, eps: float, limit: float):
    """Training forward of ``(N, C)`` activations ``x``: ``(z, mean_last, var_last)``.

    Same contract as :func:`.functional.forward_pass` for ``S = 1``, without saved tensors:
    :func:`dense_backward` recomputes what it needs from ``mean0`` and ``var0``.
    """
    x = x.contiguous()
    z = torch.empty_like(x)
    mean_last, var_last = torch.empty_like(mean0), torch.empty_like(var0)
    _call("onorm_dense_forward", x, z, *x.shape, mean0, var0, gamma, offset, alpha_fwd, eps, limit, mean_last, var_last)
    return z, mean_last, var_last


def dense_backward(grad, x, mean0, var0, gamma, offset, u0, v0, alpha_fwd, alpha_bkw, eps, limit):
    """Training backward of ``(N, C)`` activations: ``(grad_x, grad_weight, grad_bias, u_last, v_last)``."""
    grad, x = grad.contiguous(), x.contiguous()
    grad_x = torch.empty_like(x)
    u_last, v_last = u0.clone(), v0.clone()  # advanced in place by the kernel
    grad_weight, grad_bias = torch.empty_like(gamma), torch.empty_like(gamma)
    _call("onorm_dense_backward", grad, x, grad_x, *x.shape, mean0, var0, gamma, offset,
          alpha_fwd, alpha_bkw, eps, limit, u_last, v_last, grad_weight, grad_bias)  # fmt: skip
    return grad_x, grad_weight, grad_bias, u_last, v_last


def _call(name: str, *args) -> None:
    """Call ``name`` for the dtype of the first tensor; tensors must be contiguous and of that dtype."""
    dtype = args[0].dtype
    pointers = []
    for arg in args:
        if isinstance(arg, Tensor):
            assert arg.dtype == dtype and arg.is_contiguous(), (name, arg.dtype, arg.shape)
            pointers.append(arg.data_ptr())
        else:
            pointers.append(arg)
    getattr(dense_library(), f"{name}_{_TYPES[dtype]}")(*pointers, torch.get_num_threads())


@functools.cache
def dense_library() -> ctypes.CDLL | None:
    """The built kernel library, or None (with one warning) where it cannot be built."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None
    try:
        library = ctypes.CDLL(str(build(compiler, _cache_dir())))
    except (OSError, subprocess.SubprocessError, BuildError) as err:
        warnings.warn(
            f"onorm: native dense kernel unavailable ({err}); using the slower scan implementation "
            "(a writable ONORM_CACHE_DIR, or CXX naming a working C++ compiler, fixes this)",
            stacklevel=2,
        )
        return None
    for stem, argtypes in _SIGNATURES.items():
        for suffix in _TYPES.values():
            function = getattr(library, f"{stem}_{suffix}")
            function.argtypes, function.restype = argtypes, None
    return library


class BuildError(RuntimeError):
    """The compiler rejected the kernel source."""


def build(compiler: str, cache_dir: Path) -> Path:
    """Compile ``SOURCE`` into ``cache_dir`` unless a build for this source, flags and CPU is there."""
    source = SOURCE.read_bytes()
    errors = []
    for extra in (OPENMP, ()):
        flags = FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), *(f.encode() for f in flags), _cpu_identity()]))
        target = cache_dir / f"onorm_dense_{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed into place: concurrent builds never see half a file.
        fd, partial = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=cache_dir)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(partial, target)
                return target
            errors.append(next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()))
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise BuildError(f"{compiler} failed: {errors[-1]}")


def _cache_dir() -> Path:
    configured = os.environ.get("ONORM_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onorm"


def _cpu_identity() -> bytes:
    """What ``-march=native`` depends on: the architecture and, on Linux, the CPU's feature flags."""
    identity = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            identity += next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        identity += platform.processor()
    return identity.encode()
