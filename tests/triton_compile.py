"""Compile every launch of the Triton kernels for a GPU, without one: ``python tests/triton_compile.py [ARCH]``.

The interpreter that runs the kernels here is more permissive than Triton's compiler (it
never types a loop-carried value or checks an operation's dtypes against the hardware's),
so this script records the launches that :func:`forward` and :func:`backward` make for a
set of cases, without running them, and compiles each for CUDA compute capability ``ARCH``
(default 90: H100/H200) down to a cubin, as a launch on that GPU would. Prints one line per
distinct kernel compiled; exits non-zero on the first failure. Must run without
``TRITON_INTERPRET`` (the kernels must be the compiler's).
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from onorm_convert.layers import triton_kernels

TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def recorded_launches() -> list[tuple[JITFunction, tuple, dict]]:
    """The launches of the kernels for every kind of case: dense and with positions, contiguous and
    channels_last, float32/float64 statistics, half-precision activations, both controls."""
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))

    original, JITFunction.run = JITFunction.run, record
    try:
        for shape, memory_format, dtype, stat in [
            ((4, 3), torch.contiguous_format, torch.float32, torch.float32),
            ((4, 3), torch.contiguous_format, torch.bfloat16, torch.float32),
            ((4, 3, 5, 5), torch.contiguous_format, torch.float32, torch.float32),
            ((4, 3, 5, 5), torch.channels_last, torch.bfloat16, torch.float32),
            ((4, 3, 5, 5), torch.channels_last, torch.float16, torch.float32),
            ((4, 3, 5, 5), torch.contiguous_format, torch.float64, torch.float64),
        ]:
            x = torch.zeros(shape, dtype=dtype).contiguous(memory_format=memory_format)
            x3 = x.reshape(shape[0], shape[1], -1)
            state = [torch.ones(shape[1], dtype=stat) for _ in range(6)]
            triton_kernels.forward(x3, *state[:4], 0.9, 1e-5, 1.5)
            for stable in (False, True):
                triton_kernels.backward(x3, x3, *state, 0.9, 0.8, 1e-5, 1.5, stable)
    finally:
        JITFunction.run = original
    return launches


def source_of(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """The compiler's input for one launch, specialized as a launch specializes it (an int argument
    equal to 1, such as a unit stride, becomes a constant); and the launch's compile options."""
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    signature, constants = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, float):
            signature[param.name] = param.annotation_type or "fp32"
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    return ASTSource(fn=kernel, signature=signature, constexprs=constants), options


def main(argv: list[str]) -> int:
    arch = int(argv[0]) if argv else 90
    if triton_kernels.INTERPRETED:
        print("TRITON_INTERPRET is set: the kernels are the interpreter's, not the compiler's", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for kernel, args, kwargs in recorded_launches():
        source, options = source_of(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted(source.signature.items())), tuple(sorted(source.constants.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(source, target=target, options=options)
        print(f"sm_{arch} {kernel.__name__} {compiled.metadata.num_warps} warps, {len(compiled.asm['cubin'])} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
