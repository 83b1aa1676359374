"""OnlineNorm vs BatchNorm: forward + backward time and peak memory, as ratios in one process.

Training mode, float32, CPU, 2 threads, ResNet-50 activation shapes at batch 32 (contiguous,
the targets' layout, and channels_last for information) and one dense shape. OnlineNorm uses ECM clamp with affine; BatchNorm is affine. Both see the
same input and output-gradient tensors, interleaved run by run so drift hits both alike.

The compiled rows (issue 14) time ``torch.compile(layer, fullgraph=True)`` of each layer
the same way, at one conv shape (32x256x28x28) and the dense shape, with the first call
(the compile, TorchInductor's caches off) timed on its own.

``--device cuda`` (issue 15) times the same rows on the GPU (the Triton kernels against cuDNN's
BatchNorm, each step timed by CUDA events around it, launches included), in ``--dtype``
float32 or bfloat16 (activations and gradients; parameters and statistics float32), peak
memory read from the CUDA allocator.

    python benchmarks/bench_layer.py [--repeats 9] [--quick] [--no-eager | --no-compiled] [--json results.json]
        [--device cuda] [--dtype bfloat16]

Targets (issue 2): each conv shape <= 1.5x BatchNorm, their geometric mean <= 1.3x,
dense <= 5x, peak memory <= 1.2x. The compiled rows have no target. On CUDA (issue 15): the
channels_last conv shapes' geometric mean <= 1.3x cuDNN BatchNorm in float32 and in bfloat16,
dense <= 2x.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
from torch import nn
from torch.profiler._memory_profiler import MemoryProfileTimeline

from onorm_convert import OnlineNorm1d, OnlineNorm2d
from onorm_convert.layers import ops

CONV_SHAPES = [(32, 64, 56, 56), (32, 256, 28, 28), (32, 512, 14, 14), (32, 2048, 7, 7)]
DENSE_SHAPE = (256, 1024)
COMPILED_SHAPES = [(32, 256, 28, 28), DENSE_SHAPE]
TARGETS = {"conv": 1.5, "conv_geomean": 1.3, "dense": 5.0, "memory": 1.2}
CUDA_TARGETS = {"conv_channels_last_geomean": 1.3, "dense": 2.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU = torch.device("cpu")


def layer_pair(shape, device=CPU):
    """(OnlineNorm, BatchNorm) of matching dimensionality for ``shape``, on ``device``."""
    channels = shape[1]
    if len(shape) == 4:
        return OnlineNorm2d(channels).to(device), nn.BatchNorm2d(channels).to(device)
    return OnlineNorm1d(channels).to(device), nn.BatchNorm1d(channels).to(device)


def train_step(layer, x, grad):
    x.grad = None
    layer(x).backward(grad)


def activations(shape, channels_last=False, device=CPU, dtype=torch.float32):
    """Random ``(x, grad)`` of ``shape`` on ``device`` in ``dtype``, in the channels_last memory format if asked."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x, grad = (torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format) for _ in range(2))
    return x.requires_grad_(True), grad


def time_pair(shape, repeats, channels_last=False, device=CPU, dtype=torch.float32):
    """Median seconds of one forward+backward for (OnlineNorm, BatchNorm)."""
    online, batch = layer_pair(shape, device)
    x, grad = activations(shape, channels_last, device, dtype)
    for layer in (online, batch):  # warm-up: allocator, kernels (their compilation on CUDA), first-touch pages
        for _ in range(2):
            train_step(layer, x, grad)
    return alternated_medians(online, batch, x, grad, repeats)


def elapsed(step, device: torch.device) -> float:
    """Seconds one call of ``step`` takes: wall clock on the CPU; on CUDA the device's time between events
    recorded around it, which counts the launches the GPU waits for."""
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def alternated_medians(online, batch, x, grad, repeats: int) -> tuple[float, float]:
    """Median seconds of a forward+backward of each layer, the two alternated step by step (so load hits both)."""
    times = {id(online): [], id(batch): []}
    for _ in range(repeats):
        for layer in (online, batch):
            times[id(layer)].append(elapsed(lambda layer=layer: train_step(layer, x, grad), x.device))
    return statistics.median(times[id(online)]), statistics.median(times[id(batch)])


def time_compiled_pair(shape, repeats):
    """Medians of one compiled forward+backward and first-compile seconds, each (OnlineNorm, BatchNorm).

    Each layer is ``torch.compile(layer, fullgraph=True)``; its first call, which compiles
    forward and backward, is timed alone with TorchInductor's on-disk caches off.
    """
    torch._dynamo.reset()
    online, batch = (torch.compile(layer, fullgraph=True) for layer in layer_pair(shape))
    x, grad = activations(shape)
    compile_s = []
    with torch._inductor.config.patch(force_disable_caches=True):
        for layer in (online, batch):
            start = time.perf_counter()
            train_step(layer, x, grad)
            compile_s.append(time.perf_counter() - start)
        for layer in (online, batch):
            train_step(layer, x, grad)
        medians = alternated_medians(online, batch, x, grad, repeats)
    return medians, tuple(compile_s)


def warm_up_compiler():
    """A throwaway compile, so that TorchInductor's once-per-process start-up is charged to no layer."""
    torch.compile(nn.Linear(4, 4), fullgraph=True)(torch.randn(2, 4)).sum().backward()
    torch._dynamo.reset()


def peak_memory_pair(shape, channels_last=False, device=CPU, dtype=torch.float32):
    """Peak live bytes during one forward+backward above what was live before it, (OnlineNorm, BatchNorm).

    Read from PyTorch's memory profiler timeline (on CUDA: the caching allocator's peak), with the
    input and output gradient already allocated: what the layer itself adds (output, saved
    tensors, temporaries, grad_x).
    """
    peaks = []
    for layer in layer_pair(shape, device):
        x, grad = activations(shape, channels_last, device, dtype)
        train_step(layer, x, grad)  # warm-up (and compile)
        x.grad = None
        if device.type == "cuda":
            peaks.append(cuda_peak_bytes(train_step, layer, x, grad))
            continue
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            train_step(layer, x, grad)
        timeline = MemoryProfileTimeline(prof._memory_profile())
        _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
        live = [sum(per_category) for per_category in sizes]
        peaks.append(max(live) - live[0])
    return tuple(peaks)


def cuda_peak_bytes(step, *args) -> int:
    """The CUDA allocator's peak during ``step(*args)`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cuda_targets_met(rows: list[dict], geomeans: dict[str, float]) -> bool:
    """Issue 15's targets on CUDA: the channels_last conv shapes' geometric mean, and every dense row."""
    dense_ok = all(r["ratio"] <= CUDA_TARGETS["dense"] for r in rows if r["kind"] == "dense")
    return dense_ok and geomeans["conv_channels_last"] <= CUDA_TARGETS["conv_channels_last_geomean"]


def geometric_mean(ratios: list[float]) -> float:
    return math.exp(sum(map(math.log, ratios)) / len(ratios))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the harness runs")
    columns = parser.add_mutually_exclusive_group()
    columns.add_argument("--no-eager", action="store_true", help="only the compiled rows")
    columns.add_argument("--no-compiled", action="store_true", help="only the eager rows")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU (the Triton kernels against cuDNN)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the activations and gradients")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type != "cpu" and not args.no_compiled:
        parser.error("the compiled rows are timed on the CPU only: add --no-compiled")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    conv_shapes = [(4, 8, 6, 6), (4, 16, 3, 3)] if args.quick else CONV_SHAPES
    dense_shape = (16, 32) if args.quick else DENSE_SHAPE
    compiled_shapes = [conv_shapes[0], dense_shape] if args.quick else COMPILED_SHAPES

    rows = []
    summary = {}
    implementation = ops.implementation(torch.empty(0, device=device)).name
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, {device}, "
          f"{args.dtype}, OnlineNorm on the {implementation} implementation")  # fmt: skip
    targets = TARGETS if device.type == "cpu" else {"dense": CUDA_TARGETS["dense"]}
    if not args.no_eager:
        print(f"{'shape':>22} {'OnlineNorm ms':>14} {'BatchNorm ms':>13} {'ratio':>7} {'target':>7} {'mem ratio':>10}")
        cases = [(shape, False) for shape in [*conv_shapes, dense_shape]] + [(shape, True) for shape in conv_shapes]
        for shape, channels_last in cases:
            t_on, t_bn = time_pair(shape, args.repeats, channels_last, device, dtype)
            m_on, m_bn = peak_memory_pair(shape, channels_last, device, dtype)
            kind = "dense" if len(shape) == 2 else "conv_channels_last" if channels_last else "conv"
            row = {"shape": list(shape), "kind": kind, "online_ms": t_on * 1e3, "batchnorm_ms": t_bn * 1e3,
                   "ratio": t_on / t_bn, "online_peak_bytes": m_on, "batchnorm_peak_bytes": m_bn,
                   "memory_ratio": m_on / m_bn if m_bn else float("nan")}  # fmt: skip
            rows.append(row)
            label = f"{shape}{' CL' if channels_last else ''}"
            print(f"{label:>22} {row['online_ms']:14.2f} {row['batchnorm_ms']:13.2f} {row['ratio']:6.2f}x "
                  f"{f'{targets[kind]:.1f}x' if kind in targets else '-':>7} {row['memory_ratio']:9.2f}x")  # fmt: skip
        geomeans = {
            kind: geometric_mean([r["ratio"] for r in rows if r["kind"] == kind])
            for kind in ("conv", "conv_channels_last")
        }
        worst_memory = max(r["memory_ratio"] for r in rows)
        summary = {"conv_geomean": geomeans["conv"], "conv_channels_last_geomean": geomeans["conv_channels_last"]}
        if device.type == "cpu":
            print(f"conv geometric mean {geomeans['conv']:.2f}x (target {TARGETS['conv_geomean']}x); "
                  f"channels_last (BatchNorm in channels_last too, no target) {geomeans['conv_channels_last']:.2f}x; "
                  f"worst memory ratio {worst_memory:.2f}x (target {TARGETS['memory']}x)")  # fmt: skip
        else:
            summary["cuda_targets_met"] = cuda_targets_met(rows, geomeans)
            print(f"channels_last geometric mean {geomeans['conv_channels_last']:.2f}x (target "
                  f"{CUDA_TARGETS['conv_channels_last_geomean']}x), contiguous {geomeans['conv']:.2f}x (no target); "
                  f"worst memory ratio {worst_memory:.2f}x; targets met: {summary['cuda_targets_met']}")  # fmt: skip
    compiled_rows = []
    if not args.no_compiled:
        warm_up_compiler()
        print("torch.compile(fullgraph=True) of each layer, first compile without TorchInductor's caches")
        print(f"{'shape':>22} {'OnlineNorm ms':>14} {'BatchNorm ms':>13} {'ratio':>7} "
              f"{'ON compile s':>13} {'BN compile s':>13} {'ratio':>7}")  # fmt: skip
        for shape in compiled_shapes:
            (t_on, t_bn), (c_on, c_bn) = time_compiled_pair(shape, args.repeats)
            row = {"shape": list(shape), "kind": "dense" if len(shape) == 2 else "conv", "online_ms": t_on * 1e3,
                   "batchnorm_ms": t_bn * 1e3, "ratio": t_on / t_bn, "online_compile_s": c_on,
                   "batchnorm_compile_s": c_bn, "compile_time_ratio": c_on / c_bn}  # fmt: skip
            compiled_rows.append(row)
            print(f"{str(tuple(shape)) + ' compiled':>22} {row['online_ms']:14.2f} {row['batchnorm_ms']:13.2f} "
                  f"{row['ratio']:6.2f}x {c_on:13.1f} {c_bn:13.1f} {row['compile_time_ratio']:6.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            data = {"torch": torch.__version__, "threads": args.threads, "device": str(device), "dtype": args.dtype,
                    "implementation": implementation, "rows": rows, **summary}  # fmt: skip
            json.dump({**data, "compiled_rows": compiled_rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
