"""fold(): folded eval model == unfolded eval model (<= 1e-5), and the report says what happened."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d
from onorm_convert.errors import BadInputError
from onorm_convert.fold import (
    ChannelAffine,
    Clamp,
    FoldAction,
    LayerScale,
    fold,
    fold_affine_weights,
    fold_with_report,
)
from onorm_convert.shared import strip_clamps

TOL = 1e-5


def randomized(norm: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial frozen statistics and affine parameters (negative gammas included)."""
    g = torch.Generator().manual_seed(seed)
    n = norm.num_features
    with torch.no_grad():
        norm.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
        norm.running_var.copy_(torch.rand(n, generator=g) * 2.7 + 0.3)
        if norm.weight is not None:
            norm.weight.copy_(torch.rand(n, generator=g) * 3 - 1.5)
            norm.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return norm


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def norm_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, OnlineNorm1d, OnlineNorm2d, OnlineNorm3d))
    ]


CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 6, 3), OnlineNorm1d, (4, 3, 10)),
    "conv1d-nobias": (lambda: nn.Conv1d(3, 6, 3, bias=False), OnlineNorm1d, (4, 3, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), OnlineNorm2d, (4, 3, 7, 7)),
    "conv2d-nobias": (lambda: nn.Conv2d(3, 6, 3, bias=False), OnlineNorm2d, (4, 3, 7, 7)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), OnlineNorm2d, (4, 4, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, bias=False), OnlineNorm2d, (4, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3), OnlineNorm3d, (2, 2, 5, 5, 5)),
    "conv3d-nobias": (lambda: nn.Conv3d(2, 4, 3, bias=False), OnlineNorm3d, (2, 2, 5, 5, 5)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 6, 3, stride=2), OnlineNorm1d, (4, 3, 6)),
    "convT2d-grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), OnlineNorm2d, (4, 4, 5, 5)),
    "convT2d-depthwise": (lambda: nn.ConvTranspose2d(3, 6, 2, groups=3), OnlineNorm2d, (4, 3, 5, 5)),
    "convT3d-grouped": (lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), OnlineNorm3d, (2, 4, 3, 3, 3)),
    "linear": (lambda: nn.Linear(5, 6), OnlineNorm1d, (4, 5)),
    "linear-nobias": (lambda: nn.Linear(5, 6, bias=False), OnlineNorm1d, (4, 5)),
}
BATCHNORM = {OnlineNorm1d: nn.BatchNorm1d, OnlineNorm2d: nn.BatchNorm2d, OnlineNorm3d: nn.BatchNorm3d}


@pytest.mark.parametrize("flavour", ["online", "batchnorm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_norm_folds_into_its_producer_exactly(case: str, flavour: str) -> None:
    make_producer, online, shape = CASES[case]
    torch.manual_seed(0)
    producer = make_producer()
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    norm_cls = online if flavour == "online" else BATCHNORM[online]
    norm = randomized(norm_cls(channels, ecm="none") if flavour == "online" else norm_cls(channels))
    model = nn.Sequential(producer, norm, nn.ReLU()).eval()
    x = torch.randn(shape)

    folded, report = fold_with_report(model, example_inputs=[x])

    assert [(s.action, s.into) for s in report.steps] == [(FoldAction.FOLDED, "0")]
    assert norm_modules(folded) == [] and not any(isinstance(m, ChannelAffine) for m in folded.modules())
    assert max_diff(folded, model, x) <= TOL


def test_fold_affine_weights_matches_a_per_channel_loop_for_grouped_conv_transpose() -> None:
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(6, 4, 2, groups=2)  # weight (6, 2, 2, 2): groups of 3 inputs -> 2 outputs
    scale, shift = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    weight, bias = fold_affine_weights(conv.weight, conv.bias, scale, shift, transposed=True, groups=2)
    for out in range(4):
        group, j = divmod(out, 2)
        rows = slice(group * 3, group * 3 + 3)
        expected = conv.weight[rows, j].double() * scale[out]
        assert torch.allclose(weight[rows, j].double(), expected, atol=1e-7)
    assert torch.allclose(bias.double(), conv.bias.double() * scale + shift, atol=1e-7)


def test_clamp_is_kept_after_the_folded_conv_and_stripped_on_request() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomized(OnlineNorm2d(4, clamp_value=1.5))).eval()
    x = torch.randn(3, 3, 6, 6) * 4  # large enough that the clamp cuts
    with torch.no_grad():
        assert model(x).abs().max() == pytest.approx(1.5)

    kept, kept_report = fold_with_report(model)
    stripped, stripped_report = fold_with_report(model, strip_clamp=True)

    assert [type(m) for m in kept.children()] == [nn.Conv2d, Clamp]
    assert kept_report.steps[0].ecm.startswith("clamp ±1.5 kept")
    assert max_diff(kept, model, x) <= TOL
    assert [type(m) for m in stripped.children()] == [nn.Conv2d]
    assert stripped_report.steps[0].ecm == "clamp stripped"
    assert max_diff(stripped, strip_clamps(model), x) <= TOL
    assert max_diff(stripped, model, x) > 1.0  # stripping really removed the clamp


def test_layer_scaling_is_kept_and_reported() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), randomized(OnlineNorm1d(4, ecm="layer_scaling"))).eval()
    folded, report = fold_with_report(model, strip_clamp=True)
    assert [type(m) for m in folded.children()] == [nn.Linear, LayerScale]
    assert report.steps[0].action == FoldAction.FOLDED and "layer scaling kept" in report.steps[0].ecm
    assert max_diff(folded, model, torch.randn(6, 5)) <= TOL


def test_norm_without_foldable_producer_becomes_one_affine_op() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        randomized(OnlineNorm2d(3)), nn.Conv2d(3, 4, 3), nn.ReLU(), randomized(nn.BatchNorm2d(4), 1)
    ).eval()
    folded, report = fold_with_report(model)
    assert [(s.norm, s.action) for s in report.steps] == [("0", FoldAction.AFFINE), ("3", FoldAction.AFFINE)]
    assert "placeholder" in report.steps[0].reason and "'2' (ReLU)" in report.steps[1].reason
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == 2
    assert max_diff(folded, model, torch.randn(2, 3, 6, 6) * 3) <= TOL


class SkipBlock(nn.Module):
    """conv1's output feeds bn1 and the skip connection: bn1 must not fold; bn2 may."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = randomized(OnlineNorm2d(4), 5)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = randomized(nn.BatchNorm2d(4), 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return self.bn2(self.conv2(torch.relu(self.bn1(h)))) + h


def test_conv_that_also_feeds_a_skip_connection_is_not_folded() -> None:
    torch.manual_seed(7)
    model = SkipBlock().eval()
    folded, report = fold_with_report(model)
    steps = {s.norm: s for s in report.steps}
    assert steps["bn1"].action == FoldAction.AFFINE and "also feeds" in steps["bn1"].reason
    assert steps["bn2"].action == FoldAction.FOLDED and steps["bn2"].into == "conv2"
    assert max_diff(folded, model, torch.randn(2, 4, 5, 5)) <= TOL


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = randomized(OnlineNorm2d(4), 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return y if x.sum() > 0 else -y


def test_untraceable_model_still_folds_into_standalone_affines_with_the_reason() -> None:
    torch.manual_seed(9)
    model = Untraceable().eval()
    folded, report = fold_with_report(model)
    assert not report.traced and "torch.fx could not trace" in report.trace_error
    assert [(s.norm, s.action) for s in report.steps] == [("norm", FoldAction.AFFINE)]
    assert isinstance(folded.norm, nn.Sequential) and isinstance(folded.norm[0], ChannelAffine)
    for sign in (1, -1):
        x = torch.randn(2, 3, 5, 5).abs() * sign
        assert max_diff(folded, model, x) <= TOL


def test_linear_on_a_sequence_is_not_folded_when_shapes_show_the_axes_differ() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 6), randomized(OnlineNorm1d(6))).eval()  # (N, 6, 4) -> Linear -> (N, 6, 6)
    x = torch.randn(3, 6, 4)
    folded, report = fold_with_report(model, example_inputs=[x])
    assert report.steps[0].action == FoldAction.AFFINE and "rank 3" in report.steps[0].reason
    assert max_diff(folded, model, x) <= TOL


def test_batchnorm_without_running_stats_is_kept() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    folded, report = fold_with_report(model)
    assert report.steps[0].action == FoldAction.KEPT and "batch statistics" in report.steps[0].reason
    assert isinstance(folded.get_submodule("1"), nn.BatchNorm2d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_statistics_are_bad_input(bad: float) -> None:
    norm = randomized(OnlineNorm2d(4))
    norm.running_var[2] = bad
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm)
    with pytest.raises(BadInputError, match=r"layer '1' \(OnlineNorm2d\).*not finite"):
        fold(model)


def test_input_model_is_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomized(OnlineNorm2d(4))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold(model, strip_clamp=True)
    after = model.state_dict()
    assert model.training and model[1].ecm == "clamp"
    assert all(torch.equal(before[k], after[k]) for k in before)


@st.composite
def conv_stacks(draw):
    """Random Conv/ConvTranspose/Linear + norm stacks with random groups, bias, ECM and activations."""
    layers: list[nn.Module] = []
    channels = draw(st.sampled_from([2, 4]))
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([2, 4, 6]))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        bias = draw(st.booleans())
        conv_type = draw(st.sampled_from([nn.Conv2d, nn.ConvTranspose2d]))
        layers.append(conv_type(channels, out, 3, padding=1, groups=groups, bias=bias))
        kind = draw(st.sampled_from(["online", "batchnorm", "none"]))
        if kind == "online":
            layers.append(
                randomized(
                    OnlineNorm2d(out, ecm=draw(st.sampled_from(["clamp", "none", "layer_scaling"]))), len(layers)
                )
            )
        elif kind == "batchnorm":
            layers.append(randomized(nn.BatchNorm2d(out), len(layers)))
        if draw(st.booleans()):
            layers.append(nn.ReLU())
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels * 16, 3), randomized(OnlineNorm1d(3), 99)]
    return nn.Sequential(*layers).eval(), channels


@settings(max_examples=25, deadline=None)
@given(stack=conv_stacks(), strip=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_fold_matches_eval_on_random_stacks(stack, strip: bool, seed: int) -> None:
    model, _ = stack
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    x = torch.randn(3, first.in_channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    reference = strip_clamps(model) if strip else model
    folded, report = fold_with_report(model, strip_clamp=strip, example_inputs=[x])
    assert report.traced and all(step.action == FoldAction.FOLDED for step in report.steps)
    assert norm_modules(folded) == []
    with torch.no_grad():
        expected = reference(x)
        scale = max(1.0, float(expected.abs().max()))
        assert float((folded(x) - expected).abs().max()) <= TOL * scale


def test_a_norm_called_twice_is_one_step_and_stays_exact():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4).eval()
            with torch.no_grad():
                self.norm.running_mean.normal_()
                self.norm.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            return self.norm(self.norm(x))

    model = Twice().eval()
    folded, report = fold_with_report(model)
    assert [step.norm for step in report.steps] == ["norm"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
