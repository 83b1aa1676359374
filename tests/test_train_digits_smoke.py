"""The digits experiment and the train-step benchmark, on tiny settings: every code path runs and gives sane figures."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNormBase, convert

pytestmark = pytest.mark.slow  # minutes of training or real processes: make test, not make test-fast

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch):
    """Import a benchmark script as a module (they import their sibling ``common``, as when run as scripts).

    One torch thread, as the digits experiment uses: tiny tensors gain nothing from more,
    and under ``pytest -n 2`` extra threads only contend for the cores.
    """
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module
    torch.set_num_threads(threads)


def test_digits_experiment_trains_every_variant_and_exports(benchmark, tmp_path):
    digits = benchmark("train_digits")
    # A fast statistics decay, so that a few hundred samples suffice for ON's running estimates to settle.
    recipe = digits.Recipe(epochs=3, lr_at_batch_32=0.2, alpha_fwd=0.99)
    results = digits.run_experiment(recipe, tmp_path, batch_sizes=(16, 1), limit=(192, 100))

    runs = {(r["variant"], r["batch"]): r for r in results["runs"]}
    assert set(runs) == {(label, batch) for label in digits.VARIANTS for batch in (16, 1)}
    for run in runs.values():
        assert run["error"] is None
        assert len(run["history"]) == 3
        assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in run["history"])
        # Three epochs on 192 images already beat chance (10%) by far (55-82% measured); a broken pipeline would not.
        assert run["best_val_acc"] > 30.0, run
    assert results["dense_batchnorm_at_batch_1"].startswith("raises ValueError: Expected more than 1 value per channel")

    export, audit = results["export"], results["export"]["clamp_audit"]
    assert export["batch"] == 16
    assert export["export_report"]["strip_clamp"] is True
    assert [layer["layer"] for layer in audit["layers"]] == [
        name for name, module in digits.digits_resnet().named_modules() if isinstance(module, nn.BatchNorm2d)
    ]
    # The ONNX model is the stripped one: it differs from the clamped PyTorch model by exactly what the
    # audit says stripping changes (up to float32 rounding), and classifies like the stripped PyTorch model.
    assert export["max_abs_logit_difference"] == pytest.approx(audit["max_output_change"], abs=1e-4)
    assert export["onnx_val_acc"] == export["pytorch_stripped_val_acc"]
    differing_points = 100.0 * export["predictions_differing"] / 100
    assert abs(export["onnx_val_acc"] - export["pytorch_val_acc"]) <= differing_points + 1e-6
    export_target = results["targets"][-1]
    assert export_target["met"] == (export["onnx_val_acc"] == export["pytorch_val_acc"])

    table = digits.markdown_table(results)
    for label in digits.VARIANTS:
        assert f"| {label} |" in table
    assert "batch 16: best val acc" in table and "batch 1: best val acc" in table
    png = tmp_path / "curves.png"
    assert digits.plot_curves(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_split_is_fixed_stratified_and_standardized(benchmark):
    digits = benchmark("train_digits")
    first, second = digits.load_digits_split(), digits.load_digits_split()
    assert (len(first.train_y), len(first.val_y)) == (1437, 360)
    assert torch.equal(first.val_x, second.val_x) and torch.equal(first.train_y, second.train_y)
    assert first.train_x.shape[1:] == (1, 8, 8)
    assert abs(first.train_x.mean().item()) < 1e-5 and abs(first.train_x.std().item() - 1) < 1e-3
    assert torch.bincount(first.val_y).tolist() == torch.bincount(second.val_y).tolist()
    assert torch.bincount(first.val_y).min() >= 35  # stratified: every digit about a tenth of 360


def test_train_step_benchmark_models_have_torchvision_sizes(benchmark):
    bench = benchmark("bench_train_step")
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(bench.resnet18()) == 11_689_512  # torchvision.models.resnet18()
    assert count(bench.mobilenet_v2()) == 3_504_872  # torchvision.models.mobilenet_v2()


def test_train_step_benchmark_times_both_models(benchmark):
    bench = benchmark("bench_train_step")
    for build in (
        lambda: bench.resnet18(num_classes=10, width=4),
        lambda: bench.mobilenet_v2(num_classes=10, width_divisor=16),
    ):
        converted = convert(build())
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
        assert any(isinstance(m, OnlineNormBase) for m in converted.modules())
        row = bench.compare_train_steps(build, batch=2, size=32, repeats=2, num_classes=10)
        assert row["batchnorm_ms"] > 0 and row["online_ms"] > 0 and row["no_norm_ms"] > 0
        assert row["ratio"] == pytest.approx(row["online_ms"] / row["batchnorm_ms"])
        assert row["online_layers_ms"] == pytest.approx(row["online_ms"] - row["no_norm_ms"])


def test_without_norms_removes_only_the_norms(benchmark):
    bench = benchmark("bench_train_step")
    model = bench.resnet18(num_classes=10, width=4)
    bare = bench.without_norms(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bare.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.Identity) for m in bare.modules()) == norms == 20
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20  # the original is untouched
    assert {n for n, _ in bare.named_parameters()} < {n for n, _ in model.named_parameters()}
