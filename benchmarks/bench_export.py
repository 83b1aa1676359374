"""`onorm export` on a ResNet-50-sized model: pipeline wall time and deployed latency.

Prints and records (``benchmarks/results/bench_export.json``):

* the wall time of fold + export + verify (:func:`onorm_convert.export_onnx` with
  ``strip_clamp=True``) beside the bare ``torch.onnx.export`` of the same converted model
  (target: at most 1.5x);
* the onnxruntime (CPU) latency of the exported converted model beside the exported
  BatchNorm original (target: 1.00x within noise).

ResNet-50 is defined here (torchvision is not a dependency). Its BatchNorm statistics
are randomized so that the folds do real work. Run: ``python benchmarks/bench_export.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onorm_convert import convert, export_onnx  # noqa: E402
from onorm_convert.export import op_type_counts, to_onnx_proto  # noqa: E402

from common import RESULTS_DIR, environment, interleaved_medians, write_json  # noqa: E402


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), each with BatchNorm; projection shortcut when needed."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        width, out = planes, planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (25.6 M parameters, 53 BatchNorm2d layers)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if index == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*layers)


def with_trained_like_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            bn.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
            bn.bias.copy_(torch.randn(n, generator=generator) * 0.05)
    return model.eval()


def bare_export(model: nn.Module, x: torch.Tensor, path: Path) -> dict[str, int]:
    """What a user does without onorm: ``torch.onnx.export`` with a dynamic batch, saved to ``path``."""
    program = to_onnx_proto(model, [x], opset=None, dynamic_batch=True)
    program.save(str(path), external_data=False)
    return op_type_counts(program.model_proto)


def ort_session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="pipeline/export timings (interleaved, median)")
    parser.add_argument("--latency-runs", type=int, default=30, help="onnxruntime runs per model (interleaved, median)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args()

    torch.manual_seed(0)
    original = with_trained_like_statistics(resnet50())
    converted = convert(original).eval()
    x = torch.randn(1, 3, args.size, args.size)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        bare_export(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), x, folder / "warmup.onnx"
        )  # exporter start-up

        pipeline, bare, reports = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            bare_export(converted, x, folder / "bare_converted.onnx")
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            reports.append(export_onnx(converted, folder / "onorm.onnx", [x], strip_clamp=True))
            pipeline.append(time.perf_counter() - start)
            (folder / "onorm.onnx").unlink()
        report = reports[-1]
        export_onnx(converted, folder / "onorm.onnx", [x], strip_clamp=True, verify=False)
        original_ops = bare_export(original, x, folder / "original.onnx")

        sessions = {
            "onorm_stripped": ort_session(folder / "onorm.onnx"),
            "batchnorm_original": ort_session(folder / "original.onnx"),
        }
        feed = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
        latency = interleaved_medians(
            {name: (lambda s=s, f=feed[name]: s.run(None, f)) for name, s in sessions.items()},
            args.latency_runs,
            warmup=3,
        )
        outputs = {name: s.run(None, feed[name])[0] for name, s in sessions.items()}

    pipeline_s, bare_s = statistics.median(pipeline), statistics.median(bare)
    results = {
        "model": f"ResNet-50, input 1x3x{args.size}x{args.size}",
        "pipeline_seconds": pipeline_s,
        "pipeline_steps_seconds": report.seconds,
        "bare_torch_onnx_export_seconds": bare_s,
        "pipeline_over_bare": pipeline_s / bare_s,
        "ort_latency_ms": {name: seconds * 1e3 for name, seconds in latency.items()},
        "ort_latency_ratio": latency["onorm_stripped"] / latency["batchnorm_original"],
        "op_counts_equal": report.op_counts == original_ops,
        "op_counts": report.op_counts,
        "max_abs_diff_between_deployed_models": float(
            np.abs(outputs["onorm_stripped"] - outputs["batchnorm_original"]).max()
        ),
        "verification": report.verification.summary(),
        "environment": environment(),
    }
    write_json(RESULTS_DIR / "bench_export.json", results)
    print(f"{results['model']} ({torch.get_num_threads()} threads)")
    print(
        f"fold + export + verify: {pipeline_s:.2f} s  (steps: {', '.join(f'{k} {v:.2f} s' for k, v in report.seconds.items())})"
    )
    print(f"bare torch.onnx.export: {bare_s:.2f} s  -> ratio {results['pipeline_over_bare']:.2f}x (target <= 1.5x)")
    ms = results["ort_latency_ms"]
    print(f"onnxruntime latency: converted+stripped {ms['onorm_stripped']:.2f} ms, BatchNorm original {ms['batchnorm_original']:.2f} ms"
          f" -> ratio {results['ort_latency_ratio']:.3f}x (target 1.00x)")  # fmt: skip
    print(f"same ONNX op counts as the original: {results['op_counts_equal']}; {report.verification.summary()}")


if __name__ == "__main__":
    main()
