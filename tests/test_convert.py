"""convert()/revert()/check_conversion(): every architecture keeps what it computes, exactly with the ECM off."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d, OnlineNormBase, convert, revert
from onorm_convert.convert import ConversionWarning, convert_with_report, plan_conversion
from onorm_convert.errors import BadInputError, VerificationError
from onorm_convert.options import ConvertOptions
from onorm_convert.verify import EXACT_RTOL, check_conversion


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm trained-looking statistics and affine parameters (far from 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator))
    return model.eval()


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class TwoHeads(nn.Module):
    """Custom parent with a ModuleDict and ModuleList, returning a dict (nested outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.heads = nn.ModuleDict(
            {"a": nn.ModuleList([nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)]), "b": nn.BatchNorm2d(4)}
        )

    def forward(self, x):
        h = self.stem(x)
        conv, bn = self.heads["a"]
        return {"a": bn(conv(h)), "b": self.heads["b"](h)}


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does more (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.relu(super().forward(x)) * 2


class RenamedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that only changes defaults: converted like a BatchNorm2d."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=1e-3)


def shared_model() -> nn.Module:
    bn = nn.BatchNorm2d(4)
    return nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn)


ARCHITECTURES = {
    "residual": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Residual(4)), (2, 3, 6, 6)),
    "depthwise": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)),
        (2, 4, 6, 6),
    ),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 5, 2, stride=2), nn.BatchNorm2d(5)), (2, 3, 4, 4)),
    "linear_bn1d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), (3, 6)),
    "conv1d_bn1d_ncl": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)), (2, 2, 9)),
    "bn3d": (lambda: nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3)), (2, 1, 3, 4, 4)),
    "shared": (shared_model, (2, 3, 4, 4)),
    "nested_containers": (TwoHeads, (2, 3, 4, 4)),
    "plain_subclass": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), RenamedBatchNorm2d(4)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_conversion_is_exact_with_ecm_off(name):
    factory, shape = ARCHITECTURES[name]
    model = randomize_statistics(factory())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)  # a clean conversion warns about nothing
        converted = convert(model, ecm="none").eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    expected, actual = model(x), converted(x)
    for key in expected if isinstance(expected, dict) else [None]:
        e, a = (expected[key], actual[key]) if key else (expected, actual)
        torch.testing.assert_close(a, e, rtol=EXACT_RTOL, atol=1e-6)
    check = check_conversion(model, convert(model), [x])
    assert check.exact and check.exact_rel_diff <= EXACT_RTOL


def test_dimensions_follow_the_batchnorm_type():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm2d(3), nn.BatchNorm3d(4))
    converted = convert(model)
    assert [type(m) for m in converted] == [OnlineNorm1d, OnlineNorm2d, OnlineNorm3d]
    assert [m.num_features for m in converted] == [2, 3, 4]


def test_options_reach_every_layer_and_eps_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), RenamedBatchNorm2d(4))
    layer = convert(model, ecm="layer-scaling", clamp_value=3.0, alpha_fwd=0.9, alpha_bkw=0.8)[1]
    assert (layer.ecm, layer.clamp_value, layer.alpha_fwd, layer.alpha_bkw, layer.eps) == (
        "layer_scaling",
        3.0,
        0.9,
        0.8,
        1e-3,
    )


def test_inplace_keeps_the_very_parameters_and_copies_statistics():
    model = randomize_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    bn = model[1]
    bn.bias.requires_grad_(False)
    optimizer_params = list(model.parameters())
    converted = convert(model, inplace=True)
    online = converted[1]
    assert converted is model and online.weight is bn.weight and online.bias is bn.bias
    assert list(converted.parameters()) == optimizer_params  # an optimizer built before still trains the model
    assert online.weight.requires_grad and not online.bias.requires_grad
    assert torch.equal(online.running_mean, bn.running_mean) and torch.equal(online.running_var, bn.running_var)


def test_copy_leaves_the_original_and_keeps_dtype():
    model = randomize_statistics(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).double()
    converted = convert(model)
    assert isinstance(model[1], nn.BatchNorm1d)
    online = converted[1]
    assert online.weight is not model[1].weight and torch.equal(online.weight, model[1].weight)
    assert online.weight.dtype == torch.float64 and online.running_mean.dtype == torch.float64
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(convert(model, ecm="none").eval()(x), model(x), rtol=1e-12, atol=1e-12)


def test_shared_batchnorm_stays_shared():
    converted, changes = convert_with_report(shared_model())
    assert converted[1] is converted[4]
    assert len(changes) == 1 and changes[0].name == "1" and changes[0].aliases == ["4"]


def test_root_batchnorm_is_replaced():
    converted = convert(randomize_statistics(nn.BatchNorm2d(3)))
    assert isinstance(converted, OnlineNorm2d)


@pytest.mark.slow
def test_training_mode_is_kept_and_the_result_trains_at_batch_size_one():
    model = randomize_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    ).train()
    converted = convert(model)
    assert converted.training and converted[1].training
    before = converted[1].running_mean.clone()
    converted(torch.randn(1, 3, 4, 4)).sum().backward()
    assert converted[0].weight.grad is not None and not torch.equal(before, converted[1].running_mean)


def test_subclass_with_extra_forward_is_left_alone_with_a_warning():
    model = randomize_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4), nn.BatchNorm2d(4)))
    with pytest.warns(ConversionWarning, match="'1' .*overrides forward"):
        converted = convert(model)
    assert type(converted[1]) is ScaledBatchNorm2d and isinstance(converted[2], OnlineNorm2d)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(convert(model, ecm="none").eval()(x), model(x), rtol=EXACT_RTOL, atol=1e-6)


def test_model_without_batchnorm_converts_to_itself_with_a_notice():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.warns(ConversionWarning, match="no BatchNorm"):
        converted = convert(model, inplace=True)
    assert converted is model


def test_untracked_statistics_start_fresh_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.warns(ConversionWarning, match="tracked no running statistics"):
        online = convert(model)[1]
    assert torch.equal(online.running_mean, torch.zeros(4)) and torch.equal(online.running_var, torch.ones(4))


def test_lazy_uninitialized_batchnorm_is_a_clear_error():
    with pytest.raises(BadInputError, match="'1' is an uninitialized lazy BatchNorm"):
        convert(nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d()))


def test_non_finite_statistics_are_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_var[2] = float("nan")
    with pytest.raises(BadInputError, match="'1': its running_var contains NaN"):
        convert(model)


def test_include_and_exclude_globs():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    )
    with pytest.warns(ConversionWarning, match="not included"):
        only_first = convert(model, include=["0.*"])
    assert isinstance(only_first[0][1], OnlineNorm2d) and isinstance(only_first[1][1], nn.BatchNorm2d)
    with pytest.warns(ConversionWarning, match="excluded"):
        not_first = convert(model, exclude=["0.1"])
    assert isinstance(not_first[0][1], nn.BatchNorm2d) and isinstance(not_first[1][1], OnlineNorm2d)


class FrozenBatchNorm2d(nn.Module):
    """Stand-in for torchvision.ops.FrozenBatchNorm2d (buffers only), matched by class name."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (
            ("weight", torch.rand(n) + 0.5),
            ("bias", torch.randn(n)),
            ("running_mean", torch.randn(n)),
            ("running_var", torch.rand(n) + 0.5),
        ):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


def test_frozen_batchnorm_only_on_request():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4)).eval()
    with pytest.warns(ConversionWarning, match="only on request"):
        untouched = convert(model)
    assert isinstance(untouched[1], FrozenBatchNorm2d)
    converted = convert(model, frozen_bn=True, ecm="none").eval()
    assert isinstance(converted[1], OnlineNorm2d) and converted[1].weight.requires_grad
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), model(x), rtol=EXACT_RTOL, atol=1e-6)


def test_sync_batchnorm_dimension_from_neighbour_or_example_input():
    by_neighbour = convert_with_report(nn.Sequential(nn.Conv3d(1, 2, 1), nn.SyncBatchNorm(2)))
    assert isinstance(by_neighbour[0][1], OnlineNorm3d) and "neighbouring layer '0'" in by_neighbour[1][0].note

    class Alone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.SyncBatchNorm(3)

        def forward(self, x):
            return self.norm(x.unsqueeze(-1)).squeeze(-1)  # (N, C, L) -> 2d inside

    with pytest.raises(BadInputError, match="'norm' .*pass --input-shape"):
        convert(Alone())
    model = randomize_statistics(Alone())
    converted, changes = convert_with_report(model, ConvertOptions(ecm="none"), example_shapes=[(2, 3, 5)])
    assert isinstance(converted.norm, OnlineNorm2d) and changes[0].note == "dimension from the example input"
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(converted.eval()(x), model(x), rtol=EXACT_RTOL, atol=1e-6)


def test_plan_changes_nothing():
    model = shared_model()
    changes = plan_conversion(model, exclude=["4"])
    assert isinstance(model[1], nn.BatchNorm2d)
    assert [(c.name, c.new_type, c.note) for c in changes] == [("1", None, "excluded (--exclude)")]


def test_revert_round_trip_gives_batchnorm_with_the_same_output():
    model = randomize_statistics(ARCHITECTURES["residual"][0]())
    online = convert(model)
    with pytest.warns(ConversionWarning, match="cannot apply the clamp"):
        reverted = revert(online).eval()
    assert not any(isinstance(m, OnlineNormBase) for m in reverted.modules())
    assert type(reverted[1]) is nn.BatchNorm2d and reverted[1].weight is not online[1].weight
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(reverted(x), model(x), rtol=1e-6, atol=1e-6)


def test_check_reports_a_real_difference():
    model = randomize_statistics(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    converted = convert(model)
    converted[1].running_mean[0] += 0.01
    check = check_conversion(model, converted, [torch.randn(4, 3)])
    assert not check.exact and check.exact_rel_diff > EXACT_RTOL and check.max_abs_diff > 1e-3


def test_check_clamp_difference_is_measured():
    model = randomize_statistics(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    x = torch.randn(8, 3) * 100  # far outside the statistics: the clamp at 1 bites
    check = check_conversion(model, convert(model, clamp_value=1.0, clamp_mode="fixed"), [x])
    expected = (model(x) - model(x).clamp(-1, 1)).abs().max().item()
    assert check.exact and check.max_abs_diff == pytest.approx(expected, rel=1e-5)


def test_check_refuses_non_finite_outputs_and_restores_modes():
    model = randomize_statistics(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).train()
    converted = convert(model)
    with pytest.raises(VerificationError, match="NaN or Inf"):
        check_conversion(model, converted, [torch.full((2, 3), float("inf"))])
    assert model.training and converted.training and converted[1].ecm == "clamp"


def test_check_conversion_accepts_empty_outputs():
    """A detector that finds nothing returns empty tensors; the check still compares (nothing)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            y = self.body(x)
            return y[y > 1e6]  # empty

    original = Detector()
    check = check_conversion(original, convert(original), [torch.randn(3, 4)])
    assert check.exact and check.max_abs_diff == 0.0
