"""The benchmarks' compiled code paths (issue 14) run on tiny models and give sane figures."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each compiles forward and backward of two models: tens of seconds

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch):
    """Import a benchmark script as a module (they import their sibling ``common``), on one torch thread."""
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def test_compiled_train_step_column_runs(benchmark):
    bench = benchmark("bench_train_step")
    row = bench.compare_compiled_train_steps(
        lambda: bench.resnet18(num_classes=10, width=4), batch=2, size=32, repeats=1, num_classes=10, cold=False
    )
    for key in ("compiled_batchnorm_ms", "compiled_online_ms", "batchnorm_compile_s", "online_compile_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["compiled_ratio"] == pytest.approx(row["compiled_online_ms"] / row["compiled_batchnorm_ms"])
    assert row["frames_compiled"] == 2  # one graph per model, no graph break, no recompile


def test_compiled_layer_row_runs(benchmark):
    bench = benchmark("bench_layer")
    (t_on, t_bn), (c_on, c_bn) = bench.time_compiled_pair((4, 8), repeats=1)
    assert min(t_on, t_bn, c_on, c_bn) > 0
