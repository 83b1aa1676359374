"""Train-step time of a converted model against its BatchNorm original, as a ratio in one process.

One train step = forward, cross-entropy loss, backward, SGD step. CPU, float32, 2 threads,
batch 16 at 112x112; both models start from the same weights and see the same input, and
their steps are interleaved so that machine load hits both alike; median of ``--repeats``.
The models are defined here (torchvision is not a dependency): a torchvision-style
ResNet-18 and MobileNetV2. The converted model is ``onorm_convert.convert(model, ecm="clamp")``.
A third copy with the norms replaced by identities is timed alongside, so that what the
normalization layers themselves cost (step minus norm-free step) is reported too.

The compiled column (issue 14) times the same step with ``torch.compile(model, fullgraph=True)``
of each model (the optimizer step stays eager, alike for both), and the first compile of each:
the wall time of its first step, with TorchInductor's caches off (``--warm-cache`` keeps them),
after a throwaway compile has paid the once-per-process start-up.

``--device cuda`` (issue 15) runs the same steps on the GPU (the converted model on the Triton
kernels, the original on cuDNN's BatchNorm; each step ends in a synchronize), optionally under
``--autocast bfloat16`` with the models and batch in ``--channels-last`` memory format;
``--models resnet50`` adds torchvision's ResNet-50 layout, defined here too.

    python benchmarks/bench_train_step.py [--repeats 7] [--quick] [--models resnet18 ...]
        [--no-eager | --no-compiled] [--compiled-repeats N] [--json PATH]
        [--device cuda] [--autocast bfloat16] [--channels-last]

Targets: eager (issue 5) ResNet-18 <= 1.10x, MobileNetV2 <= 1.30x BatchNorm's train step;
compiled (issue 14) <= 1.10x compiled BatchNorm's for both, first compile <= 1.5x BatchNorm's;
on CUDA (issue 15) ResNet-50, bf16 autocast, channels_last, batch 64 at 224x224 <= 1.10x.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onorm_convert import convert
from onorm_convert.layers import ops

from common import RESULTS_DIR, BasicBlock, environment, interleaved_medians, write_json

TARGETS = {"resnet18": 1.10, "mobilenet_v2": 1.30, "resnet50": 1.10}
CPU = torch.device("cpu")
COMPILED_TARGET = 1.10  # compiled ON over compiled BN, both models
COMPILE_TIME_TARGET = 1.5  # ON's first compile over BN's


def imagenet_stem(width: int) -> list[nn.Module]:
    """torchvision's ResNet stem: 7x7 conv (stride 2), BatchNorm, ReLU, 3x3 max-pool (stride 2)."""
    return [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]


def resnet18(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """torchvision's ResNet-18 layout: 7x7 stem, max-pool, four stages of two basic blocks."""
    layers = imagenet_stem(width)
    in_channels = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        channels = width * 2**stage
        layers += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet-50 block (torchvision's v1.5): 1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BatchNorm."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out_channels = channels * 4
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )  # fmt: skip
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.block(x) + identity)


def resnet50(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """torchvision's ResNet-50 layout: 7x7 stem, max-pool, stages of 3, 4, 6 and 3 bottleneck blocks."""
    layers = imagenet_stem(width)
    in_channels = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        channels = width * 2**stage
        for index in range(blocks):
            layers.append(Bottleneck(in_channels, channels, 2 if stage > 0 and index == 0 else 1))
            in_channels = channels * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6, "same" padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [conv_bn_relu6(in_channels, hidden, 1, 1)]
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, output channels, repeats, first stride): torchvision's MobileNetV2 table at width 1.0.
MOBILENET_V2_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def mobilenet_v2(num_classes: int = 1000, width_divisor: int = 1) -> nn.Module:
    """torchvision's MobileNetV2 layout (``width_divisor`` > 1 shrinks every width, for quick runs)."""
    in_channels = 32 // width_divisor
    layers: list[nn.Module] = [conv_bn_relu6(3, in_channels, 3, 2)]
    for expansion, channels, repeats, stride in MOBILENET_V2_STAGES:
        channels = max(channels // width_divisor, 1)
        for index in range(repeats):
            layers.append(InvertedResidual(in_channels, channels, stride if index == 0 else 1, expansion))
            in_channels = channels
    last = 1280 // width_divisor
    layers += [conv_bn_relu6(in_channels, last, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers += [nn.Dropout(0.2), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


def sgd_train_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    compiled: bool = False,
    autocast: torch.dtype | None = None,
) -> Callable[[], None]:
    """A closure running one train step of ``model`` on the fixed batch: forward, loss, backward, SGD.

    ``compiled``: the forward is ``torch.compile(model, fullgraph=True)``; nothing compiles
    until the closure's first call (forward and backward both compile then). ``autocast``:
    the forward and loss run under ``torch.autocast`` to that dtype. On CUDA the step ends
    with a synchronize, so that a wall clock around it times the GPU's work.
    """
    model.train()
    forward = torch.compile(model, fullgraph=True) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    device = inputs.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(forward(inputs), targets)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def warm_up_compiler() -> None:
    """One throwaway compile of a forward and backward, so that what a process pays once
    (importing and initialising TorchInductor, finding the C++ compiler) is not charged to
    whichever model compiles first."""
    layer = nn.Linear(4, 4)
    torch.compile(layer, fullgraph=True)(torch.randn(2, 4)).sum().backward()
    torch._dynamo.reset()


def without_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm replaced by ``nn.Identity`` (the cost of everything else)."""
    stripped = copy.deepcopy(model)
    for name, module in list(stripped.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(stripped.get_submodule(parent), attr, nn.Identity())
    return stripped


def models_and_batch(
    build: Callable[[], nn.Module],
    batch: int,
    size: int,
    num_classes: int,
    seed: int,
    device: torch.device = CPU,
    channels_last: bool = False,
):
    """``build()`` (BatchNorm), its conversion (clamp), and one seeded batch of inputs and targets, on ``device``
    (models and inputs in the channels_last memory format if asked)."""
    torch.manual_seed(seed)
    original = build()
    converted = convert(copy.deepcopy(original), ecm="clamp")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, size, size, generator=generator)
    targets = torch.randint(0, num_classes, (batch,), generator=generator)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    original, converted = (model.to(device, memory_format=memory_format) for model in (original, converted))
    inputs = inputs.to(device).contiguous(memory_format=memory_format)
    return original, converted, inputs, targets.to(device)


def compare_train_steps(
    build: Callable[[], nn.Module],
    batch: int,
    size: int,
    repeats: int,
    num_classes: int = 1000,
    seed: int = 0,
    device: torch.device = CPU,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median train-step milliseconds of ``build()`` with BatchNorm, converted to OnlineNorm (clamp), and without norms.

    All three start from the same weights and train on the same seeded batch (on ``device``,
    see :func:`models_and_batch` and :func:`sgd_train_step`). ``ratio`` is OnlineNorm's step
    over BatchNorm's; subtracting the norm-free step gives what the normalization layers
    themselves cost in each (``*_layers_ms``, ``layers_ratio``).
    """
    original, converted, inputs, targets = models_and_batch(
        build, batch, size, num_classes, seed, device, channels_last
    )
    models = {"batchnorm": original, "online": converted, "no_norm": without_norms(original)}
    steps = {name: sgd_train_step(model, inputs, targets, autocast=autocast) for name, model in models.items()}
    medians = interleaved_medians(steps, repeats)
    ms = {name: seconds * 1e3 for name, seconds in medians.items()}
    return {
        "batchnorm_ms": ms["batchnorm"],
        "online_ms": ms["online"],
        "ratio": ms["online"] / ms["batchnorm"],
        "no_norm_ms": ms["no_norm"],
        "batchnorm_layers_ms": ms["batchnorm"] - ms["no_norm"],
        "online_layers_ms": ms["online"] - ms["no_norm"],
        "layers_ratio": (ms["online"] - ms["no_norm"]) / (ms["batchnorm"] - ms["no_norm"]),
    }


def compare_compiled_train_steps(
    build: Callable[[], nn.Module],
    batch: int,
    size: int,
    repeats: int,
    num_classes: int = 1000,
    seed: int = 0,
    cold: bool = True,
) -> dict[str, float]:
    """Compiled train steps of ``build()`` with BatchNorm and converted to OnlineNorm (clamp).

    Same weights and batch as :func:`compare_train_steps`. Each model's first step (which
    compiles its forward and backward) is timed on its own, BatchNorm's first, with
    TorchInductor's on-disk caches off when ``cold``; then the compiled steps run
    interleaved, median of ``repeats``. Returns milliseconds per step, ``ratio`` (ON over
    BN), the first-compile seconds and their ratio, and how many frames compiled.
    """
    original, converted, inputs, targets = models_and_batch(build, batch, size, num_classes, seed)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    steps = {
        "batchnorm": sgd_train_step(original, inputs, targets, compiled=True),
        "online": sgd_train_step(converted, inputs, targets, compiled=True),
    }
    compile_s = {}
    with torch._inductor.config.patch(force_disable_caches=cold):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            compile_s[name] = time.perf_counter() - start
        medians = interleaved_medians(steps, repeats, warmup=1)
    ms = {name: seconds * 1e3 for name, seconds in medians.items()}
    return {
        "compiled_batchnorm_ms": ms["batchnorm"],
        "compiled_online_ms": ms["online"],
        "compiled_ratio": ms["online"] / ms["batchnorm"],
        "batchnorm_compile_s": compile_s["batchnorm"],
        "online_compile_s": compile_s["online"],
        "compile_time_ratio": compile_s["online"] / compile_s["batchnorm"],
        "frames_compiled": int(counters["stats"]["unique_graphs"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed eager steps per model (median taken)")
    parser.add_argument(
        "--compiled-repeats", type=int, default=None, help="timed compiled steps per model (default: --repeats)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112, help="input height and width")
    parser.add_argument("--quick", action="store_true", help="narrow models at 32x32, to check the harness runs")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(TARGETS), default=["resnet18", "mobilenet_v2"],
        help="which models (default: resnet18 mobilenet_v2)",
    )  # fmt: skip
    columns = parser.add_mutually_exclusive_group()
    columns.add_argument("--no-eager", action="store_true", help="skip the eager column (compiled only)")
    columns.add_argument("--no-compiled", action="store_true", help="skip the compiled column (eager only)")
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep TorchInductor's on-disk caches for the first compile"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / "bench_train_step.json", help="where to write the figures"
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU (the Triton kernels against cuDNN)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="run forward and loss under torch.autocast")
    parser.add_argument("--channels-last", action="store_true", help="models and batch in channels_last")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    autocast = getattr(torch, args.autocast) if args.autocast else None
    if device.type != "cpu" and not args.no_compiled:
        parser.error("the compiled column is timed on the CPU only: add --no-compiled")
    torch.set_num_threads(args.threads)
    size = 32 if args.quick else args.size
    compiled_repeats = args.repeats if args.compiled_repeats is None else args.compiled_repeats
    builders = {
        "resnet18": (lambda: resnet18(width=8)) if args.quick else resnet18,
        "mobilenet_v2": (lambda: mobilenet_v2(width_divisor=8)) if args.quick else mobilenet_v2,
        "resnet50": (lambda: resnet50(width=8)) if args.quick else resnet50,
    }
    models = {name: builders[name] for name in args.models}

    rows: dict[str, dict] = {name: {} for name in models}
    if not args.no_eager:
        implementation = ops.implementation(torch.empty(0, device=device)).name
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {size}x{size}, "
              f"median of {args.repeats} interleaved train steps (eager), {device}, autocast {args.autocast}, "
              f"channels_last {args.channels_last}, OnlineNorm on the {implementation} implementation")  # fmt: skip
        print(f"{'model':>13} {'BatchNorm ms':>13} {'OnlineNorm ms':>14} {'ratio':>7} {'target':>7}      "
              f"{'no-norm ms':>10} {'BN layers ms':>12} {'ON layers ms':>12} {'layers ratio':>12}")  # fmt: skip
        for name, build in models.items():
            row = compare_train_steps(build, args.batch, size, args.repeats, device=device, autocast=autocast,
                                      channels_last=args.channels_last)  # fmt: skip
            row["target"] = TARGETS[name]
            row["meets_target"] = row["ratio"] <= row["target"]
            rows[name].update(row)
            print(f"{name:>13} {row['batchnorm_ms']:13.1f} {row['online_ms']:14.1f} {row['ratio']:6.2f}x {row['target']:6.2f}x"
                  f"  {'ok    ' if row['meets_target'] else 'MISSED'}{row['no_norm_ms']:10.1f} {row['batchnorm_layers_ms']:12.1f} "
                  f"{row['online_layers_ms']:12.1f} {row['layers_ratio']:11.2f}x")  # fmt: skip
    if not args.no_compiled:
        warm_up_compiler()
        print(f"torch.compile(fullgraph=True), median of {compiled_repeats} interleaved train steps; first compile "
              f"{'with' if args.warm_cache else 'without'} TorchInductor's caches")  # fmt: skip
        print(f"{'model':>13} {'BatchNorm ms':>13} {'OnlineNorm ms':>14} {'ratio':>7} {'target':>7}      "
              f"{'BN compile s':>12} {'ON compile s':>12} {'ratio':>7} {'target':>7}")  # fmt: skip
        for name, build in models.items():
            row = compare_compiled_train_steps(build, args.batch, size, compiled_repeats, cold=not args.warm_cache)
            row["compiled_target"] = COMPILED_TARGET
            row["compiled_meets_target"] = row["compiled_ratio"] <= COMPILED_TARGET
            row["compile_time_target"] = COMPILE_TIME_TARGET
            row["compile_time_meets_target"] = row["compile_time_ratio"] <= COMPILE_TIME_TARGET
            rows[name].update(row)
            print(f"{name:>13} {row['compiled_batchnorm_ms']:13.1f} {row['compiled_online_ms']:14.1f} "
                  f"{row['compiled_ratio']:6.2f}x {COMPILED_TARGET:6.2f}x  {'ok    ' if row['compiled_meets_target'] else 'MISSED'}"
                  f"{row['batchnorm_compile_s']:12.1f} {row['online_compile_s']:12.1f} {row['compile_time_ratio']:6.2f}x "
                  f"{COMPILE_TIME_TARGET:6.2f}x  {'ok' if row['compile_time_meets_target'] else 'MISSED'}")  # fmt: skip
    settings = {"batch": args.batch, "size": size, "repeats": args.repeats, "compiled_repeats": compiled_repeats,
                "quick": args.quick, "ecm": "clamp", "eager": not args.no_eager, "compiled": not args.no_compiled,
                "compile_cache": args.warm_cache, "device": str(device), "autocast": args.autocast,
                "channels_last": args.channels_last}  # fmt: skip
    write_json(args.json, {"environment": environment(), "settings": settings, "models": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
