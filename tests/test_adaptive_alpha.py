"""``alpha_mode="adaptive"`` against a per-sample reference of its own equations, and what the rule does.

Each training call is the doc's equations at the alpha the layer holds (the reference of
``tests/reference.py`` run at that alpha); between calls, alpha moves by the rule of
``onorm_convert.layers.adaptive_alpha``, written here again, element by element, in Python floats.
Both paths (native kernels and scans), several steps so that state carries over, float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from onorm_convert import OnlineNorm1d, OnlineNorm2d, convert, load_model, save_checkpoint
from onorm_convert.layers.adaptive_alpha import BOUNDS, RATE

from conftest import assert_matches, layer_step, native_kernels, reference_of, reference_step

KINDS = {  # (layer class, per-sample shape, memory format)
    "dense": (OnlineNorm1d, (4,), torch.contiguous_format),
    "2d": (OnlineNorm2d, (4, 3, 3), torch.contiguous_format),
    "2d-channels-last": (OnlineNorm2d, (4, 3, 3), torch.channels_last),
}


def reference_rule(alpha, last_shift, mean_old, var_old, mean_new, eps, batch):
    """The rule from its equations: shift, its cosine with the last one, the clipped log step."""
    shift = [(new - old) / math.sqrt(var + eps) for new, old, var in zip(mean_new, mean_old, var_old)]
    norms = math.sqrt(sum(s * s for s in shift)) * math.sqrt(sum(s * s for s in last_shift))
    rho = sum(s * t for s, t in zip(shift, last_shift)) / norms if norms > 0 else 0.0
    log_k = math.log(1 - alpha) + RATE * batch * rho
    log_k = min(max(log_k, math.log(1 - BOUNDS[1])), math.log(1 - BOUNDS[0]))
    return 1 - math.exp(log_k), shift


START = 0.995  # inside BOUNDS: the rule can move it either way


def _layer(cls, channels, alpha_fwd=START):
    layer = cls(channels, alpha_fwd=alpha_fwd, alpha_bkw=0.8, ecm="none", alpha_mode="adaptive").double()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("batch", [1, 5, 37])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", ["native", "scan"])
def test_each_call_is_the_reference_at_the_alpha_the_rule_chose(path, kind, batch):
    torch.manual_seed(batch + len(kind))
    cls, sample_shape, memory_format = KINDS[kind]
    layer = _layer(cls, sample_shape[0])
    reference = reference_of(layer)
    last_shift = [0.0] * sample_shape[0]
    for step in range(4):
        alpha = layer.alpha_now.item()  # what this call uses (START rounded to float32 at first)
        drift = 0.3 * step  # a stream whose mean moves: alpha must move too
        x = (torch.randn(batch, *sample_shape, dtype=torch.float64) + drift).contiguous(memory_format=memory_format)
        grad = torch.randn_like(x)
        mean_old, var_old = reference.mu.tolist(), reference.var.tolist()
        reference.a_f = alpha
        with native_kernels(path == "native"):
            actual = layer_step(layer, x, grad)
        expected = reference_step(reference, x, grad)
        assert_matches(actual, expected, rtol=1e-10, context=f"{path} {kind} step {step}")
        alpha, last_shift = reference_rule(
            alpha, last_shift, mean_old, var_old, reference.mu.tolist(), layer.eps, batch
        )
        assert layer.alpha_now.item() == pytest.approx(alpha, rel=1e-12), f"step {step}"
        torch.testing.assert_close(
            layer.last_shift, torch.tensor(last_shift, dtype=torch.float64), rtol=1e-10, atol=1e-12
        )
    assert abs(alpha - START) > 1e-5  # the rule moved it (at batch 1, by 1/32 of batch 32's step)


def _stream(layer, batches, drift_per_call, batch=32):
    """Train-mode calls (forward only) on a stream whose mean moves by ``drift_per_call`` per call."""
    with torch.no_grad():
        for call in range(batches):
            layer(torch.randn(batch, layer.num_features, 4, 4) + drift_per_call * call)


def test_a_drifting_stream_shortens_the_memory_and_a_stationary_one_lengthens_it():
    torch.manual_seed(0)
    drifting, stationary = (OnlineNorm2d(8, alpha_fwd=START, alpha_mode="adaptive").train() for _ in range(2))
    _stream(drifting, 30, drift_per_call=0.2)
    _stream(stationary, 30, drift_per_call=0.0)
    assert drifting.alpha_now.item() == pytest.approx(BOUNDS[0])  # lagging statistics: as fast as allowed
    assert stationary.alpha_now.item() > START + 0.001  # noise only: slower
    assert stationary.alpha_now.item() <= BOUNDS[1] + 1e-7  # float32 state


def test_the_rate_is_per_sample():
    """A call of 1 sample moves alpha 32 times less than a call of 32 with the same correlation."""
    torch.manual_seed(1)
    small, large = (OnlineNorm1d(4, alpha_mode="adaptive", alpha_fwd=START).train() for _ in range(2))
    with torch.no_grad():
        for layer, batch in ((small, 1), (large, 32)):
            for call in range(2):  # the same direction twice: rho = 1 on the second call
                layer(torch.full((batch, 4), 10.0 * (call + 1)))
    step_small = math.log(1 - small.alpha_now.item()) - math.log(1 - START)
    step_large = math.log(1 - large.alpha_now.item()) - math.log(1 - START)
    assert step_small == pytest.approx(RATE * 1, rel=1e-4) and step_large == pytest.approx(RATE * 32, rel=1e-4)


def test_eval_mode_and_a_fixed_layer_leave_alpha_alone():
    layer = OnlineNorm2d(3, alpha_fwd=0.99, alpha_mode="adaptive").eval()
    layer(torch.randn(4, 3, 2, 2) + 5)
    assert layer.alpha_now.item() == pytest.approx(0.99)
    fixed = OnlineNorm2d(3, alpha_fwd=0.99)
    assert "alpha_now" not in fixed.state_dict() and "alpha_mode" not in repr(fixed)
    assert "alpha_mode='adaptive'" in repr(layer)


def test_convert_defaults_to_adaptive_and_the_checkpoint_keeps_the_learned_alpha(tmp_path):
    model = _model()
    assert convert(model)[1].alpha_mode == "adaptive"
    converted = convert(model, alpha_fwd=START).train()
    norm = converted[1]
    assert norm.alpha_now.item() == pytest.approx(START)
    with torch.no_grad():
        for call in range(5):
            converted(torch.randn(8, 1, 6, 6) + call)
    learned = norm.alpha_now.item()
    assert learned != pytest.approx(START)

    path = tmp_path / "tuned.pt"
    save_checkpoint(converted, path, arch="test_adaptive_alpha:_model")
    loaded = load_model(path)
    assert loaded[1].alpha_mode == "adaptive" and loaded[1].alpha_now.item() == pytest.approx(learned)
    assert convert(model, alpha_mode="fixed")[1].alpha_mode == "fixed"


def _model():
    """The arch the checkpoint tests name (``test_adaptive_alpha:_model``): a conv, a BatchNorm, a ReLU."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def test_files_from_before_the_adaptive_alpha_come_back_as_fixed_alpha_layers(tmp_path):
    """A checkpoint whose layer records lack alpha_mode, and a plain state dict without alpha_now, as older onorm wrote."""
    converted = convert(_model(), alpha_mode="fixed")
    path = tmp_path / "old.pt"
    save_checkpoint(converted, path, arch="test_adaptive_alpha:_model")
    checkpoint = torch.load(path, weights_only=True)
    for entry in checkpoint["layers"].values():
        del entry["config"]["alpha_mode"]
    torch.save(checkpoint, path)  # the signature covers the code, not the layer records
    assert load_model(path)[1].alpha_mode == "fixed"

    torch.save(converted.state_dict(), tmp_path / "old_sd.pt")
    with pytest.warns(UserWarning, match="rebuilt with the defaults"):
        loaded = load_model(tmp_path / "old_sd.pt", arch="test_adaptive_alpha:_model")
    assert loaded[1].alpha_mode == "fixed"
    torch.testing.assert_close(loaded.state_dict(), converted.state_dict())
