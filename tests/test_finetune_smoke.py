"""The fine-tuning benchmark (benchmarks/finetune.py) on tiny settings: its whole code path, and figures that can fail."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from onorm_convert import OnlineNormBase, convert

pytestmark = pytest.mark.slow  # minutes of training or real processes: make test, not make test-fast

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def finetune(monkeypatch):
    """``benchmarks/finetune.py`` as a module, on one torch thread (tiny tensors; the cores are shared under -n 2)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module("finetune")
    torch.set_num_threads(threads)


def test_every_model_is_pretrained_converted_and_fine_tuned_at_both_batch_sizes(finetune, tmp_path):
    config = finetune.QUICK
    results = finetune.run_benchmark(config, list(finetune.TUNED), {finetune.ON_LABEL: {}})

    assert [m["model"] for m in results["models"]] == list(finetune.TUNED)
    for model in results["models"]:
        # Three epochs of pretraining on 256 images already beats chance (10%): a broken pipeline would not.
        assert model["pretrained_acc"] > 10.0, model["model"]
        assert model["at_conversion"]["ON"]["predictions_changed"] == 0, model["model"]
        for run in model["runs"]:
            assert run["steps"] == config.steps[run["batch"]]
            if run["error"] is None:
                assert math.isfinite(run["final_acc"]) and len(run["curve"]) == config.curve_points + 1
    runs = {(m["model"], r["variant"], r["batch"]): r for m in results["models"] for r in m["runs"]}
    assert runs["mlp", "BN", 1]["error"].startswith("step 1: ValueError")  # dense BatchNorm1d refuses batch 1
    assert all(r["error"] is None for (_, variant, _), r in runs.items() if variant == "ON")
    assert {(t["model"], t["batch"]) for t in results["targets"]} == {
        (m, b) for m in finetune.TUNED for b in config.steps
    }

    table = finetune.markdown_table(results)
    assert table.count("\n| strided_resnet |") == 3 and "NaN runs" in table  # two batch rows and the conversion row
    assert finetune.plot_curves(results, tmp_path / "finetune.png") and (tmp_path / "finetune.png").stat().st_size > 0


def test_the_held_out_models_build_convert_and_run(finetune):
    """The models the defaults were not chosen on (the benchmark trains them; here: that they are sound)."""
    digits = torch.rand(4, 1, 8, 8)
    for name in set(finetune.MODELS) - set(finetune.TUNED):
        spec = finetune.MODELS[name]
        x = spec.shape(digits)
        model = spec.build().eval()
        torch.testing.assert_close(convert(model, ecm="none").eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_the_failing_model_is_the_issues(finetune):
    model = finetune.strided_resnet()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [n.num_features for n in norms] == [16, 16, 16, 32, 32, 32, 64, 64, 64]  # stem, then 3 blocks
    assert len(projections) == 2 and all(p.stride == (2, 2) for p in projections)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert finetune.MODELS["strided_resnet"].recipe == finetune.Recipe("sgd", lr=0.02, momentum=0.9, weight_decay=5e-4)
    assert finetune.MODELS["strided_resnet"].pretrain_epochs == 4


def test_the_warm_up_schedule_rises_then_decays(finetune):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = finetune.ADAMW_RECIPE.schedule_for(optimizer, 20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0)  # warm-up over 10% of 20 steps
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.05


def test_the_step_schedule_cuts_tenfold_at_its_share_of_the_run(finetune):
    optimizer = finetune.SGD_NESTEROV_STEP_RECIPE.optimizer_for([torch.zeros(1, requires_grad=True)], lr=1.0)
    assert optimizer.param_groups[0]["nesterov"] is True
    schedule = finetune.SGD_NESTEROV_STEP_RECIPE.schedule_for(optimizer, 10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([1.0] * 5 + [0.1] * 5)
    assert isinstance(finetune.ADAM_RECIPE.optimizer_for([torch.zeros(1, requires_grad=True)], 1.0), torch.optim.Adam)


def test_a_converted_model_is_fine_tuned_as_online_norm(finetune):
    spec = finetune.MODELS["conv1d"]
    split = finetune.load_digits_split(limit=(64, 32))
    data = finetune.Data.shaped(split, spec)
    model = finetune.convert(spec.build())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = finetune.train(model, data, spec.recipe, 4, spec.recipe.lr, steps=3, seed=0, curve_points=1)
    assert run["error"] is None and len(run["curve"]) == 2
    assert any(isinstance(m, OnlineNormBase) for m in model.modules())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # the recipe's optimizer trained it
