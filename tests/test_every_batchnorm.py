"""Every BatchNorm in the wild: timm's norm-act layers, subclasses that compute more, other libraries' convolutions.

timm and torchvision are not dependencies (their wheels do not install beside the CPU torch
build), so the classes below are faithful look-alikes: same class names, bases, constructors,
attributes and forward as timm's ``layers/norm_act.py`` and torchvision's ``Conv3DSimple``.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onorm_convert import convert, export_onnx, revert, save_checkpoint
from onorm_convert.checkpoint import layout_of, make_checkpoint, restore_layout, write_checkpoint
from onorm_convert.convert import ConversionWarning, plan_conversion
from onorm_convert.errors import BadInputError
from onorm_convert.fold import Clamp, FoldAction, fold, fold_with_report
from onorm_convert.layers import OnlineNorm3d, OnlineNormAct2d
from onorm_convert.load import LoadWarning, load_model
from onorm_convert.verify import EXACT_RTOL

from conftest import onorm

# --- look-alikes -----------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: batch norm, then ``self.drop``, then ``self.act``."""

    def __init__(
        self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
        act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace, **(act_kwargs or {})) if apply_act else nn.Identity()

    def forward(self, x):
        training = self.training or self.running_mean is None
        x = F.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, training, 0.0 if self.momentum is None else self.momentum, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.SyncBatchNormAct: built by timm's convert_sync_batchnorm, which sets drop and act afterwards."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def sync_norm_act(source: BatchNormAct2d) -> SyncBatchNormAct:
    """What timm's convert_sync_batchnorm makes of a BatchNormAct2d."""
    sync = SyncBatchNormAct(source.num_features, source.eps, source.momentum, source.affine)
    sync.load_state_dict(source.state_dict())
    sync.drop, sync.act = source.drop, source.act
    return sync


class FrozenBatchNormAct2d(nn.Module):
    """timm.layers.FrozenBatchNormAct2d: buffers only (no num_features), then drop and act."""

    def __init__(
        self, num_features, eps=1e-5, apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True,
        drop_layer=None,
    ):  # fmt: skip
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace, **(act_kwargs or {})) if apply_act else nn.Identity()

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(self.drop(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)))


class Conv3DSimple(nn.Conv3d):
    """torchvision.models.video.resnet.Conv3DSimple: a Conv3d subclass that keeps Conv3d's forward."""

    def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding, bias=False)

    @staticmethod
    def get_downsample_stride(stride):
        return stride, stride, stride


class StdConv2d(nn.Conv2d):
    """timm.layers.StdConv2d: weight standardization in its own forward; nothing can fold into it."""

    def __init__(self, in_channels, out_channels, kernel_size, eps=1e-6):
        super().__init__(in_channels, out_channels, kernel_size, bias=False)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """An unknown subclass with its own forward: left as it is everywhere."""

    def forward(self, x):
        return torch.relu(super().forward(x)) * 2


# --- models ----------------------------------------------------------------------------------------


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics and affine values (negative gammas included) in every norm; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_mean", None) is not None:
                n = module.running_mean.numel()
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
                module.weight.copy_(torch.rand(n, generator=generator) * 3 - 1.5)
                module.bias.copy_(torch.randn(n, generator=generator))
    return model.eval()


def norm_act_net() -> nn.Module:
    """A timm-style CNN: every norm a BatchNormAct2d (SiLU, LeakyReLU with dropout, none)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        BatchNormAct2d(6, act_layer=nn.SiLU),
        nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False),
        BatchNormAct2d(6, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}, drop_layer=nn.Dropout),
        nn.Conv2d(6, 4, 1),
        BatchNormAct2d(4, apply_act=False),
    )


def sync_net() -> nn.Module:
    model = norm_act_net()
    model[1] = sync_norm_act(model[1])
    return model


def frozen_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4, act_layer=nn.Hardswish))


def video_net() -> nn.Module:
    """r3d_18's blocks: Conv3DSimple then BatchNorm3d then ReLU."""
    return nn.Sequential(Conv3DSimple(2, 4), nn.BatchNorm3d(4), nn.ReLU(), Conv3DSimple(4, 4), nn.BatchNorm3d(4))


NETS = {"batchnorm_act": norm_act_net, "sync_batchnorm_act": sync_net, "frozen_batchnorm_act": frozen_net}
IMAGE = (2, 3, 6, 6)


def image() -> torch.Tensor:
    return torch.randn(IMAGE, generator=torch.Generator().manual_seed(1))


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=EXACT_RTOL, atol=1e-6)


def converted_exactly(model: nn.Module, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)  # every norm converts
        return convert(model, ecm="none", frozen_bn=True, **options).eval()


# --- convert ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NETS))
def test_norm_act_layers_convert_to_online_norm_act_with_the_same_output(name: str) -> None:
    model = randomized(NETS[name]())
    x = image()
    expected = model(x)
    converted = converted_exactly(model)
    norms = [m for m in converted.modules() if isinstance(m, OnlineNormAct2d)]
    assert len(norms) == (3 if name != "frozen_batchnorm_act" else 1)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNormAct2d)) for m in converted.modules())
    assert_same(converted(x), expected)


def test_conversion_keeps_the_very_drop_and_act_modules() -> None:
    model = randomized(norm_act_net())
    acts, drops = [m.act for m in model[1::2]], [m.drop for m in model[1::2]]
    converted = converted_exactly(model, inplace=True)
    assert [m.act for m in converted[1::2]] == acts and all(
        a is b for a, b in zip([m.act for m in converted[1::2]], acts)
    )
    assert all(m.drop is d for m, d in zip(converted[1::2], drops))
    assert [c.new_type for c in plan_conversion(norm_act_net())] == ["OnlineNormAct2d"] * 3


def test_frozen_norm_act_is_converted_only_on_request() -> None:
    with pytest.warns(ConversionWarning, match="FrozenBatchNormAct2d is converted only on request"):
        untouched = convert(frozen_net())
    assert isinstance(untouched[1], FrozenBatchNormAct2d)
    assert converted_exactly(randomized(frozen_net()))[1].weight.requires_grad


def test_a_converted_norm_act_layer_trains() -> None:
    converted = convert(norm_act_net()).train()
    converted(image()).square().sum().backward()
    assert converted[0].weight.grad is not None and converted[1].weight.grad is not None


# --- the subclass rule -----------------------------------------------------------------------------


def unknown_subclass_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4), nn.Conv2d(4, 4, 1), BatchNormAct2d(4))


class NormActSubclass(BatchNormAct2d):
    """A subclass of a registered norm-act type that adds a module: it computes more than BatchNormAct2d."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.extra = nn.Identity()


def test_convert_leaves_a_subclass_that_computes_more() -> None:
    with pytest.warns(ConversionWarning) as caught:
        converted = convert(nn.Sequential(ScaledBatchNorm2d(4), NormActSubclass(4)))
    messages = " ".join(str(w.message) for w in caught)
    assert (
        "ScaledBatchNorm2d overrides forward" in messages
        and "NormActSubclass holds more than BatchNormAct2d" in messages
    )
    assert [type(m) for m in converted] == [ScaledBatchNorm2d, NormActSubclass]


def test_fold_keeps_a_subclass_that_computes_more_and_an_unconverted_norm_act() -> None:
    model = randomized(unknown_subclass_net())
    x = image()
    folded, report = fold_with_report(model)
    kept = [(s.norm, s.action) for s in report.steps]
    assert kept == [("1", FoldAction.KEPT), ("3", FoldAction.KEPT)]
    assert "ScaledBatchNorm2d overrides forward" in report.steps[0].reason
    assert "exported as its own ops" in report.steps[1].reason
    assert_same(folded(x), model(x))


def test_fold_of_an_untraceable_model_keeps_them_too() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = randomized(unknown_subclass_net())

        def forward(self, x):
            return self.body(x) if x.sum() > -1e9 else x  # data-dependent: fx cannot trace it

    model = Untraceable().eval()
    folded, report = fold_with_report(model)
    assert not report.traced and [s.action for s in report.steps] == [FoldAction.KEPT] * 2
    assert_same(folded(image()), model(image()))


def test_inspect_promises_no_fold_for_a_subclass_convert_refuses(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(randomized(unknown_subclass_net()), path)
    result = onorm("inspect", path, "--trust", "--json")
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["1"]["new_type"] is None and "overrides forward" in layers["1"]["note"]
    assert layers["1"]["export"].startswith("kept: ScaledBatchNorm2d overrides forward")
    assert (layers["3"]["new_type"], layers["3"]["export"]) == ("OnlineNormAct2d", "fold into '2'")  # once converted


# --- fold ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ecm", ["none", "clamp"])
def test_a_converted_norm_act_folds_into_its_conv_and_keeps_its_activation(ecm: str) -> None:
    model = randomized(norm_act_net())
    converted = convert(model, ecm=ecm).eval()
    x = image()
    folded, report = fold_with_report(converted)
    assert [(s.action, s.into) for s in report.steps] == [
        (FoldAction.FOLDED, "0"),
        (FoldAction.FOLDED, "2"),
        (FoldAction.FOLDED, "4"),
    ]
    kept = [type(m) for m in folded.modules() if not isinstance(m, (nn.Conv2d, nn.Sequential, torch.fx.GraphModule))]
    clamps = [Clamp] if ecm == "clamp" else []
    assert kept == [*clamps, nn.SiLU, *clamps, nn.Dropout, nn.LeakyReLU, *clamps]  # the ECM, then drop, then act
    assert not any(isinstance(m, OnlineNormAct2d) for m in folded.modules())
    assert_same(folded(x), converted(x))


def test_a_norm_act_without_a_producer_becomes_an_affine_op_then_its_activation() -> None:
    converted = convert(nn.Sequential(nn.ReLU(), BatchNormAct2d(3, act_layer=nn.SiLU)), ecm="none").eval()
    folded, report = fold_with_report(converted)
    assert report.steps[0].action == FoldAction.AFFINE
    assert_same(folded(image()), converted(image()))


@pytest.mark.parametrize("online", [False, True])
def test_norms_fold_into_a_conv_subclass_that_keeps_the_base_forward(online: bool) -> None:
    model = randomized(video_net())
    model = convert(model, ecm="none").eval() if online else model
    x = torch.randn(2, 2, 3, 5, 5)
    folded, report = fold_with_report(model)
    assert [(s.action, s.into) for s in report.steps] == [(FoldAction.FOLDED, "0"), (FoldAction.FOLDED, "3")]
    assert not any(isinstance(m, (nn.BatchNorm3d, OnlineNorm3d)) for m in folded.modules())
    assert_same(folded(x), model(x))


def test_a_conv_subclass_with_its_own_forward_says_why_nothing_folds_into_it() -> None:
    model = randomized(nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)))
    folded, report = fold_with_report(model)
    (step,) = report.steps
    assert step.action == FoldAction.AFFINE and "'0': StdConv2d overrides forward" in step.reason
    assert_same(folded(image()), model(image()))


# --- revert ----------------------------------------------------------------------------------------


def test_revert_gives_back_the_norm_act_class_with_the_same_drop_and_act() -> None:
    model = randomized(norm_act_net())
    online = convert(model, ecm="none").eval()
    reverted = revert(online, inplace=True)
    assert [type(m) for m in reverted[1::2]] == [BatchNormAct2d] * 3
    assert isinstance(reverted[1].act, nn.SiLU) and isinstance(reverted[3].drop, nn.Dropout)
    assert_same(reverted(image()), model(image()))
    assert type(revert(convert(sync_net(), ecm="none"))[1]) is SyncBatchNormAct


def test_revert_without_a_batchnorm_class_to_build_gives_batchnorm_then_drop_and_act() -> None:
    model = randomized(frozen_net())
    online = convert(model, ecm="none", frozen_bn=True).eval()
    act = online[1].act
    reverted = revert(online, inplace=True)
    assert [type(m) for m in reverted[1]] == [nn.BatchNorm2d, nn.Identity, nn.Hardswish] and reverted[1][2] is act
    assert_same(reverted(image()), model(image()))
    bare = nn.Sequential(OnlineNormAct2d(3, ecm="none", act=nn.ReLU()))  # built by hand: no class recorded
    assert [type(m) for m in revert(bare)[0]] == [nn.BatchNorm2d, nn.Identity, nn.ReLU]


# --- checkpoint ------------------------------------------------------------------------------------


def test_the_checkpoint_layout_rebuilds_each_norm_act_layer() -> None:
    converted = convert(randomized(norm_act_net()), ecm="none", alpha_fwd=0.9).eval()
    layout = layout_of(converted)
    assert layout["1"]["act"] == {"class": "SiLU", "args": {"inplace": True}}
    assert layout["3"]["drop"] == {"class": "Dropout", "args": {"p": 0.5, "inplace": False}}
    rebuilt = restore_layout(norm_act_net(), layout, "model.pt")
    rebuilt.load_state_dict(converted.state_dict())
    assert [type(m.act) for m in rebuilt[1::2]] == [nn.SiLU, nn.LeakyReLU, nn.Identity]
    assert rebuilt[3].act.negative_slope == 0.2 and rebuilt[1].alpha_fwd == 0.9
    assert_same(rebuilt.eval()(image()), converted(image()))
    assert type(revert(rebuilt)[1]) is BatchNormAct2d  # the class the arch code built


def test_a_checkpoint_round_trip_through_the_file(tmp_path) -> None:
    converted = convert(randomized(norm_act_net())).eval()
    save_checkpoint(converted, tmp_path / "c.pt", arch="test_every_batchnorm:norm_act_net", input_shapes=[IMAGE])
    loaded = load_model(tmp_path / "c.pt").eval()
    assert [type(m) for m in loaded[1::2]] == [OnlineNormAct2d] * 3
    assert_same(loaded(image()), converted(image()))


class Swish(nn.Module):
    """An activation of another library (like timm's own GELU): code a checkpoint cannot record."""

    def forward(self, x):
        return x * torch.sigmoid(x)


def test_a_checkpoint_refuses_an_activation_it_cannot_rebuild_without_code() -> None:
    converted = convert(nn.Sequential(BatchNormAct2d(3, act_layer=lambda inplace: Swish())))
    with pytest.raises(BadInputError, match=r"'0.act' is a test_every_batchnorm.Swish; .* only as one of torch.nn's"):
        layout_of(converted)


# --- export ----------------------------------------------------------------------------------------


def bare_onnx_op_counts(model: nn.Module, x: torch.Tensor) -> Counter:
    """Op counts of the plain torch.onnx export of ``model``, as a user would do it."""
    program = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
    )
    return Counter(node.op_type for node in program.model_proto.graph.node)


EXPORTS = {"norm_act": (norm_act_net, IMAGE), "video": (video_net, (1, 2, 3, 5, 5))}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_the_converted_export_has_the_op_counts_of_the_batchnorm_original(name: str, tmp_path) -> None:
    factory, shape = EXPORTS[name]
    original = randomized(factory())
    x = torch.randn(shape)
    report = export_onnx(convert(original), tmp_path / "m.onnx", [x], strip_clamp=True)
    assert report.verification.passed and report.fold.count("folded") == len(report.fold.steps)
    assert Counter(report.op_counts) == bare_onnx_op_counts(original, x)


@pytest.mark.slow
def test_an_unknown_subclass_exports_as_its_own_ops(tmp_path) -> None:
    original = randomized(unknown_subclass_net())
    x = torch.randn(IMAGE)
    report = export_onnx(original, tmp_path / "m.onnx", [x])
    assert report.verification.passed and report.fold.count("kept") == 2
    assert Counter(report.op_counts) == bare_onnx_op_counts(original, x)


@pytest.mark.filterwarnings("ignore:'1' \\(ScaledBatchNorm2d\\) left as is")
def test_fold_equals_the_model_for_every_look_alike() -> None:
    for factory in (*NETS.values(), unknown_subclass_net):
        model = randomized(factory())
        for candidate in (model, convert(model, frozen_bn=True).eval()):
            assert_same(fold(candidate)(image()), candidate(image()))


def test_a_recorded_module_outside_the_allow_list_is_a_damaged_file(tmp_path) -> None:
    converted = convert(norm_act_net(), ecm="none")
    checkpoint = make_checkpoint(converted, arch="test_every_batchnorm:norm_act_net", arch_kwargs={}, conversion={})
    checkpoint["layers"]["1"]["act"] = {"class": "Module", "args": {}}
    write_checkpoint(tmp_path / "c.pt", checkpoint)
    with pytest.raises(BadInputError, match="field 'layers' is missing or malformed"):
        load_model(tmp_path / "c.pt")


def test_a_plain_state_dict_of_a_converted_norm_act_model_keeps_its_activations(tmp_path) -> None:
    converted = convert(randomized(norm_act_net())).eval()
    torch.save(converted.state_dict(), tmp_path / "sd.pt")
    with pytest.warns(LoadWarning):
        loaded = load_model(tmp_path / "sd.pt", arch="test_every_batchnorm:norm_act_net").eval()
    assert [type(m.act) for m in loaded[1::2]] == [nn.SiLU, nn.LeakyReLU, nn.Identity]
    assert_same(loaded(image()), converted(image()))


class DenseLayerLookAlike(nn.Module):
    """torchvision DenseNet's pre-activation layer: the norm reads a concat, so it has no producer to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.norm, self.relu, self.conv = nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.conv(self.relu(self.norm(torch.cat([self.a(x), self.b(x)], dim=1))))


@pytest.mark.slow
def test_a_norm_that_cannot_fold_exports_as_one_op_like_the_batchnorm_original(tmp_path):
    from onorm_convert import fold

    original = DenseLayerLookAlike()
    with torch.no_grad():
        original.norm.running_mean.uniform_(-1, 1)
        original.norm.running_var.uniform_(0.5, 2)
        original.norm.weight.uniform_(0.5, 2)
    original.eval()
    x = torch.randn(2, 1, 6, 6)
    converted = convert(original)
    folded = fold(converted, strip_clamp=True)
    torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-6)
    report = export_onnx(converted, tmp_path / "dense.onnx", [x], strip_clamp=True)
    assert report.verification.passed
    assert report.op_counts.get("BatchNormalization") == 1 and "Mul" not in report.op_counts
    original_ops = export_onnx(original, tmp_path / "original.onnx", [x]).op_counts
    assert report.op_counts == original_ops
