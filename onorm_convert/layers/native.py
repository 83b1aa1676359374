"""The training passes as native code: ``native.cpp``, built once per machine.

The scans of :mod:`.functional` evaluate every recurrence batch-parallel, which needs the
per-sample statistics as ``(N, C)`` tensors, several passes over the activations, and a
compiler (TorchInductor) to fuse them. The C++ kernels instead walk the stream once per
pass, each channel on its own, and recompute the forward state in backward: a training
step reads the activations once each way and keeps nothing of their size but the input.
Dense ``(N, C)``, contiguous ``(N, C, S)`` and channels_last activations each have a kernel
here on CPU; other strided layouts are copied to the contiguous one.

The library is compiled with ``$CXX`` (default ``g++``), as TorchInductor compiles its own
CPU kernels, and cached under ``$ONORM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/onorm``, else
``~/.cache/onorm``; it must be private to the user) keyed by source, compiler, flags and CPU. Without
a compiler the layers take the scans; where the build fails they do too, and one warning
says why (:mod:`.ops` chooses, once).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native.cpp")
# -ffp-contract=off: forward and backward compute z alike (backward recomputes the clamp mask).
# -fno-trapping-math: lets the compiler vectorize the clamp mask's select.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)  # dropped, single-threaded, where the compiler lacks OpenMP (Apple clang)
_TYPES = {torch.float32: "f32", torch.float64: "f64"}
_P, _N, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
# fmt: off
_SIGNATURES = {
    "onorm_dense_forward": [_P, _P, _N, _N, _P, _P, _P, _P, _F, _F, _F, _P, _P, ctypes.c_int],
    "onorm_dense_backward": [_P, _P, _P, _N, _N, _P, _P, _P, _P, _F, _F, _F, _F, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P,
                             ctypes.c_int],
    "onorm_spatial_forward": [_P, _P, _N, _N, _N, _P, _P, _P, _P, _F, _F, _F, _P, _P, ctypes.c_int],
    "onorm_spatial_backward": [_P, _P, _P, _N, _N, _N, _P, _P, _P, _P, _F, _F, _F, _F, ctypes.c_int, ctypes.c_int, _P, _P, _P,
                               _P, ctypes.c_int],
    # The traced step's two kernels (ops.py): the forward's per-sample statistics, the backward's control.
    "onorm_dense_statistics": [_P, _N, _N, _P, _P, _F, _F, _P, _P, _P, _P, _P, _P, ctypes.c_int],
    "onorm_spatial_statistics": [_P, _N, _N, _N, _P, _P, _F, _F, _P, _P, _P, _P, _P, _P, ctypes.c_int],
    "onorm_control": [_P, _P, _P, _P, _P, _P, _N, _N, _F, _F, _F, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P,
                      ctypes.c_int],
}
# fmt: on
_SIGNATURES.update(
    {name.replace("spatial", "channels_last"): types for name, types in _SIGNATURES.items() if "spatial" in name}
)


def forward(x3, mean0, var0, gamma, offset, alpha_fwd: float, eps: float, limit: float):
    """Training forward of activations ``x3`` (``(N, C, S)``): ``(z, mean_last, var_last)``, ``z`` shaped as ``x3``.

    The contract of :func:`.functional.scan_forward`: :func:`backward` recomputes what it
    needs from ``mean0`` and ``var0``.
    """
    layout = _layout(x3)
    x = _to_kernel(layout, x3)
    mean0, var0, gamma, offset = _per_channel(x3, mean0, var0, gamma, offset)
    z = torch.empty_like(x)
    mean_last, var_last = torch.empty_like(mean0), torch.empty_like(var0)
    _call(f"onorm_{layout}_forward", x, z, *_sizes(layout, x3), mean0, var0, gamma, offset, alpha_fwd, eps, limit,
          mean_last, var_last)  # fmt: skip
    return _from_kernel(layout, z, x3), mean_last, var_last


def backward(grad3, x3, mean0, var0, gamma, offset, u0, v0, alpha_fwd, alpha_bkw, eps, limit, stable: bool = False,
             project: bool = False):  # fmt: skip
    """Training backward of ``(N, C, S)`` activations: ``(grad_x, grad_weight, grad_bias, u_last, v_last)``.

    ``stable``: v advances by the implicit form of its recurrence (``control="stable"``, see
    :func:`.functional.backward_statistics`), else by the doc's step. ``project``
    (``projection="batch"``): ``grad_x`` is :func:`.functional.batch_projection`'s, from the same sums (its input-gradient pass waits for
    the batch's last sample).
    """
    layout = _layout(x3)
    x, grad = _to_kernel(layout, x3), _to_kernel(layout, grad3)
    mean0, var0, gamma, offset, u0, v0 = _per_channel(x3, mean0, var0, gamma, offset, u0, v0)
    grad_x = torch.empty_like(x)
    u_last, v_last = u0.clone(), v0.clone()  # advanced in place by the kernel
    grad_weight, grad_bias = torch.empty_like(gamma), torch.empty_like(gamma)
    _call(f"onorm_{layout}_backward", grad, x, grad_x, *_sizes(layout, x3), mean0, var0, gamma, offset,
          alpha_fwd, alpha_bkw, eps, limit, int(stable), int(project), u_last, v_last, grad_weight, grad_bias)  # fmt: skip
    return _from_kernel(layout, grad_x, x3), grad_weight, grad_bias, u_last, v_last


def statistics(x3, mean0, var0, alpha_fwd: float, eps: float):
    """The training forward's statistics of ``(N, C, S)`` activations: ``(center, inv_k, d, s, mean_last, var_last)``.

    The contract of :func:`.functional.scan_statistics`: per sample and channel (each ``(N, C)``)
    mu_prev, ``1 / k``, ``d = m - mu_prev`` and the biased variance; the state after the batch.
    """
    layout = _layout(x3)
    x = _to_kernel(layout, x3)
    mean0, var0 = _per_channel(x3, mean0, var0)
    per_sample = [x.new_empty(x3.shape[:2]) for _ in range(4)]
    mean_last, var_last = torch.empty_like(mean0), torch.empty_like(var0)
    _call(f"onorm_{layout}_statistics", x, *_sizes(layout, x3), mean0, var0, alpha_fwd, eps, *per_sample, mean_last,
          var_last)  # fmt: skip
    return *per_sample, mean_last, var_last


def control(sum_g, sum_g_xc, center, inv_k, d, s, u0, v0, alpha_bkw: float, eps: float, count: int, stable: bool,
            project: bool):  # fmt: skip
    """The training backward's control from per-sample sums: ``(xc_coef, const, u_last, v_last)``.

    The contract of :func:`.functional.scan_control`.
    """
    per_sample = [t.contiguous() for t in (sum_g, sum_g_xc, center, inv_k, d, s)]
    u_last, v_last = (t.clone() for t in _per_channel(sum_g, u0, v0))  # advanced in place by the kernel
    xc_coef, const = torch.empty_like(per_sample[0]), torch.empty_like(per_sample[0])
    _call("onorm_control", *per_sample, *sum_g.shape, float(count), alpha_bkw, eps, int(stable), int(project), u_last,
          v_last, xc_coef, const)  # fmt: skip
    return xc_coef, const, u_last, v_last


def _layout(x3: Tensor) -> str:
    """The kernel for activations ``x3`` (``(N, C, S)``): ``dense``, ``channels_last`` or ``spatial``.

    channels_last means channels innermost (``x3.transpose(1, 2)`` contiguous); any other
    strides are copied to the contiguous layout of ``spatial``.
    """
    if x3.shape[2] == 1:
        return "dense"
    return "channels_last" if not x3.is_contiguous() and x3.transpose(1, 2).is_contiguous() else "spatial"


def _to_kernel(layout: str, t3: Tensor) -> Tensor:
    """``t3`` (``(N, C, S)``) as the contiguous tensor the layout's kernel reads: ``(N, C)``, ``(N, S, C)`` or ``(N, C, S)``."""
    if layout == "dense":
        return t3[:, :, 0].contiguous()
    return (t3.transpose(1, 2) if layout == "channels_last" else t3).contiguous()


def _from_kernel(layout: str, t: Tensor, like3: Tensor) -> Tensor:
    """The kernel's output ``t`` as ``(N, C, S)`` like ``like3``; channels_last stays channels_last (a view)."""
    return t.transpose(1, 2) if layout == "channels_last" else t.reshape(like3.shape)


def _sizes(layout: str, x3: Tensor) -> tuple[int, ...]:
    """The sizes the layout's kernel takes: ``(N, C)`` for dense, else ``(N, C, S)``."""
    return tuple(x3.shape[:2]) if layout == "dense" else tuple(x3.shape)


def _per_channel(x: Tensor, *vectors: Tensor) -> list[Tensor]:
    """``vectors`` as contiguous ``(C,)`` tensors; a ValueError for any other shape.

    The kernel reads and writes ``C`` values through each pointer: a wrong size would be
    out-of-bounds memory access, not an exception.
    """
    channels = x.shape[1]
    for vector in vectors:
        if vector.shape != (channels,):
            raise ValueError(f"per-channel tensor of shape {tuple(vector.shape)} for {channels} channels")
    return [vector.contiguous() for vector in vectors]


def _call(name: str, *args) -> None:
    """Call ``name`` for the dtype of the first tensor (every tensor checked contiguous, of that dtype).

    The library must have loaded (:func:`library` not None).
    """
    dtype = args[0].dtype
    pointers = []
    for arg in args:
        if isinstance(arg, Tensor):
            if arg.dtype != dtype or not arg.is_contiguous():
                raise ValueError(
                    f"{name}: a {arg.dtype} tensor of strides {arg.stride()} where contiguous {dtype} is needed"
                )
            pointers.append(arg.data_ptr())
        else:
            pointers.append(arg)
    _kernels[f"{name}_{_TYPES[dtype]}"](*pointers, torch.get_num_threads())


@functools.cache
def cxx_compiler() -> str | None:
    """The C++ compiler (``$CXX``, default ``g++``), or None; looked up once (PATH walks are slow)."""
    return shutil.which(os.environ.get("CXX", "g++"))


# The loaded library's functions by name, bound once by library(): no lookup on a call's path.
_kernels: dict[str, ctypes._CFuncPtr] = {}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot be had.

    No C++ compiler: None, silently, as TorchInductor's policy (the layer keeps the scans).
    A compiler that fails, or a cache folder that cannot be used: None with one warning.
    """
    _kernels.clear()
    compiler = cxx_compiler()
    if compiler is None:
        return None
    try:
        loaded = ctypes.CDLL(str(build(compiler, _cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # BuildError is a RuntimeError
        warnings.warn(
            f"onorm: native kernels unavailable ({err}); using the slower scan implementation "
            "(a private, writable ONORM_CACHE_DIR, or CXX naming a working C++ compiler, fixes this)",
            stacklevel=2,
        )
        return None
    for stem, argtypes in _SIGNATURES.items():
        for suffix in _TYPES.values():
            function = getattr(loaded, f"{stem}_{suffix}")
            function.argtypes, function.restype = argtypes, None
            _kernels[f"{stem}_{suffix}"] = function
    return loaded


class BuildError(RuntimeError):
    """The kernel cannot be built or cached here (compiler error, unsafe cache folder)."""


def build(compiler: str, cache_dir: Path) -> Path:
    """Compile ``SOURCE`` into ``cache_dir`` unless a build for this source, compiler, flags and CPU is there.

    The OpenMP build is preferred; where the compiler lacks OpenMP the plain one is used
    (its kernel runs on one thread). Every candidate is looked up before anything compiles.
    """
    _check_private(cache_dir)
    candidates, errors = [], []
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            candidates.append((flags, cache_dir / f"onorm_native_{_build_key(compiler, flags)}.so"))
        except BuildError as err:  # e.g. no OpenMP
            errors.append(str(err))
    for _, target in candidates:
        if target.exists():
            _check_private(target)
            return target
    for flags, target in candidates:
        # Built beside the target and renamed into place: concurrent builds never see half a file.
        fd, partial = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=cache_dir)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", partial],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=300,
            )
            if done.returncode == 0:
                os.replace(partial, target)
                _prune(cache_dir, keep=target)
                return target
            errors.append(f"{compiler} failed: {_error_line(done.stderr, done.returncode)}")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise BuildError(errors[-1])


# Builds of other sources (older onorm versions) and partial builds of killed processes are
# removed once this old: a version still in use is rebuilt in a second, a running build never
# takes this long.
STALE_SECONDS = 30 * 24 * 3600


def _prune(cache_dir: Path, keep: Path) -> None:
    """Remove stale builds from ``cache_dir`` (see ``STALE_SECONDS``); never ``keep``, never anything else."""
    cutoff = time.time() - STALE_SECONDS
    for path in [*cache_dir.glob("onorm_native_*.so"), *cache_dir.glob(".build-*.so")]:
        with contextlib.suppress(OSError):  # another process may prune or use it at the same moment
            if path != keep and path.lstat().st_mtime < cutoff:
                path.unlink()


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    """A hash of the source, the compiler and flags, and what they mean on this machine.

    The compiler's predefined macros under these flags name its version and every
    instruction set ``-march=native`` enables here: a cache shared between machines never
    hands one a build for another's CPU.
    """
    macros = subprocess.run(
        [compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, errors="replace", timeout=60
    )  # fmt: skip
    if macros.returncode != 0:
        raise BuildError(f"{compiler} failed: {_error_line(macros.stderr, macros.returncode)}")
    parts = [SOURCE.read_bytes(), compiler.encode(), *(f.encode() for f in flags), macros.stdout.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _error_line(stderr: str, returncode: int) -> str:
    """The compiler's first line mentioning an error (else its first line, else its exit status)."""
    lines = stderr.strip().splitlines()
    return next((line for line in lines if "error" in line), lines[0] if lines else f"exit status {returncode}")


def _cache_dir() -> Path:
    """``$ONORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/onorm``, else ``~/.cache/onorm``; created private (0700)."""
    configured = os.environ.get("ONORM_CACHE_DIR")
    if configured:
        folder = Path(configured)
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onorm"  # Path.home(): RuntimeError
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _check_private(path: Path) -> None:
    """Refuse a cache folder or library that another user could have written or redirected: it is code we would run."""
    if not hasattr(os, "getuid"):
        return
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif info.st_uid != os.getuid():
        problem = "belongs to another user"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = "is writable by others"
    else:
        return
    raise BuildError(f"{path} {problem}; it may not hold code to run")
