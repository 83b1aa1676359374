"""export_onnx/export_torch and verification: op counts, the mismatch path, structured outputs, inputs files."""

from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, OnlineNorm2d, convert, export_onnx, export_torch
from onorm_convert.errors import BadInputError
from onorm_convert.export import FAILED_SUFFIX, ExportMismatchError
from onorm_convert.fold import fold
from onorm_convert.inputs import fit_inputs, load_input_file
from onorm_convert.options import ExportOptions
from onorm_convert.verify import clamp_audit, compare_arrays, compare_outputs

from test_fold import randomized

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the sample models live at the repository root, beside the package
from sample_models import models as samples  # noqa: E402

SAMPLES = ["digits_mlp", "digits_resnet", "digits_conv1d", "volume_net"]
NORMALIZATION_ARITHMETIC = {"BatchNormalization", "Sqrt", "Div", "Sub", "Mul", "Clip"}


def trained_sample(name: str) -> nn.Module:
    model = getattr(samples, name)()
    model.load_state_dict(torch.load(REPO / "sample_models" / f"{name}.pt", weights_only=True))
    return model.eval()


def bare_onnx_op_counts(model: nn.Module, x: torch.Tensor) -> Counter:
    """Op counts of the plain torch.onnx export (dynamo exporter, dynamic batch), as a user would do it."""
    program = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
    )
    return Counter(node.op_type for node in program.model_proto.graph.node)


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.slow
def test_stripped_converted_sample_has_the_op_counts_of_the_batchnorm_original(name: str, tmp_path) -> None:
    original = trained_sample(name)
    x = torch.randn(samples.INPUT_SHAPES[name])
    converted = convert(original)

    report = export_onnx(converted, tmp_path / "m.onnx", [x], strip_clamp=True)

    assert report.verification.passed and report.fold.count("folded") == len(report.fold.steps) > 0
    assert Counter(report.op_counts) == bare_onnx_op_counts(original, x)
    assert not NORMALIZATION_ARITHMETIC & set(report.op_counts)
    written = Counter(node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node)
    assert written == Counter(report.op_counts)


@pytest.mark.slow
def test_kept_clamp_is_one_clip_per_layer_and_no_batchnorm(tmp_path) -> None:
    converted = convert(trained_sample("digits_resnet"))
    report = export_onnx(converted, tmp_path / "m.onnx", [torch.randn(1, 1, 8, 8)])
    assert report.verification.passed
    assert report.op_counts["Clip"] == len(report.fold.steps) == 5
    assert not {"BatchNormalization", "Sqrt", "Div", "Sub", "Mul"} & set(report.op_counts)


@torch.fx.wrap  # opaque to fold's fx tracing, so the lie reaches the exporter
def lie_when_exported(y: torch.Tensor) -> torch.Tensor:
    return y + 0.01 if torch.compiler.is_exporting() else y


class Liar(nn.Module):
    """Computes something else while being exported: the export must fail verification."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = randomized(OnlineNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lie_when_exported(self.norm(self.conv(x)))


@pytest.mark.parametrize("keep_failed", [False, True])
def test_mismatch_publishes_nothing(tmp_path, keep_failed: bool) -> None:
    destination = tmp_path / "liar.onnx"
    with pytest.raises(ExportMismatchError, match="MISMATCH") as caught:
        export_onnx(Liar().eval(), destination, [torch.randn(1, 3, 6, 6)], keep_failed=keep_failed)
    report = caught.value.report
    assert caught.value.exit_code == 1 and not report.verification.passed
    assert all(0.009 < check.max_abs < 0.011 for check in report.verification.checks)
    assert not destination.exists() and report.path is None
    kept = tmp_path / f"liar{FAILED_SUFFIX}.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ([kept.name] if keep_failed else [])
    assert report.kept_failed == (str(kept) if keep_failed else None)


class TwoInputsStructuredOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = randomized(OnlineNorm2d(4), 1)
        self.fc = nn.Linear(5, 2)
        self.norm_fc = randomized(nn.BatchNorm1d(2), 2)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> dict:
        features = self.norm(self.conv(image))
        return {"features": features, "pair": (self.norm_fc(self.fc(vector)), features.mean((2, 3)))}


def test_several_inputs_and_dict_tuple_outputs_verify(tmp_path) -> None:
    model = TwoInputsStructuredOutputs().eval()
    real = [torch.randn(3, 3, 6, 6), torch.randn(3, 5)]
    report = export_onnx(model, tmp_path / "two.onnx", [torch.randn(1, 3, 6, 6), torch.randn(1, 5)], real_inputs=real)
    checks = report.verification.checks
    assert report.verification.passed
    assert sorted({c.batch for c in checks}) == ["random batch 1", "random batch 2", "real inputs (batch 3)"]
    assert [c.output for c in checks[:3]] == ["output['features']", "output['pair'][0]", "output['pair'][1]"]
    assert checks[-1].shape == (3, 4)
    assert report.fold.count("folded") == 2


def test_non_finite_outputs_never_verify(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomized(nn.BatchNorm2d(4)))
    model.append(type("Log", (nn.Module,), {"forward": lambda self, x: torch.log(x)})())
    with pytest.raises(ExportMismatchError) as caught:
        export_onnx(model.eval(), tmp_path / "nan.onnx", [torch.randn(2, 3, 6, 6)])
    checks = caught.value.report.verification.checks
    assert checks and all(not c.passed and "non-finite (NaN/Inf) values" in c.problem for c in checks)
    assert not (tmp_path / "nan.onnx").exists()


def test_torch_format_reloads_without_pickle_and_matches(tmp_path) -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), randomized(OnlineNorm1d(4)), nn.ReLU()).eval()
    report = export_torch(model, tmp_path / "m.pt2", [torch.randn(1, 2, 9)], strip_clamp=True)
    assert report.verification.passed and report.format == "torch"
    program = torch.export.load(io.BytesIO((tmp_path / "m.pt2").read_bytes()))
    x = torch.randn(5, 2, 9)
    assert torch.allclose(program.module()(x), fold(model, strip_clamp=True)(x), atol=1e-6)


def test_compare_arrays_never_passes_nan_and_applies_the_tolerance_formula() -> None:
    ref = np.array([1.0, 100.0, 0.0], dtype=np.float32)
    nan = np.array([np.nan, 1.0, 0.0], dtype=np.float32)
    assert compare_arrays(nan, nan, 1e-4, 1e-3)[2:] == (False, "the PyTorch output has 1 non-finite (NaN/Inf) values")
    max_abs, max_rel, passed, _ = compare_arrays(ref, ref + np.array([0, 0.105, 0], dtype=np.float32), 1e-4, 1e-3)
    assert not passed and max_abs == pytest.approx(0.105, rel=1e-4) and max_rel == pytest.approx(1.05e-3, rel=1e-3)
    assert compare_arrays(ref, ref + np.array([0, 0.09, 1e-4], dtype=np.float32), 1e-4, 1e-3)[2]
    assert "shape" in compare_arrays(ref, ref[:2], 1, 1)[3]


def test_per_output_tolerances() -> None:
    reference = [("output[0]", np.zeros(3, np.float32)), ("output[1]", np.zeros(3, np.float32))]
    candidate = [np.full(3, 0.01, np.float32), np.full(3, 0.01, np.float32)]
    checks = compare_outputs("b", reference, candidate, {"output[1]": 0.1, "*": 1e-4}, 0.0)
    assert [(c.passed, c.atol) for c in checks] == [(False, 1e-4), (True, 0.1)]
    assert all(
        not c.passed and "outputs" in c.problem for c in compare_outputs("b", reference, candidate[:1], 1.0, 0.0)
    )


def test_clamp_audit_counts_cut_activations_and_the_output_change() -> None:
    model = nn.Sequential(OnlineNorm1d(4)).eval()  # mean 0, var 1, gamma 1, beta 0: z = x / sqrt(1 + eps)
    x = torch.tensor([[0.0, 2.0, 6.0, -7.0], [1.0, -1.0, 4.0, 5.5]])
    audit = clamp_audit(model, [x])
    z = x / np.sqrt(1 + 1e-5)
    (layer,) = audit.layers
    assert (layer.layer, layer.activations, layer.clipped, layer.fraction) == ("0", 8, 3, 3 / 8)
    assert layer.max_change == pytest.approx(float(z.abs().max()) - 5.0, rel=1e-6)
    assert audit.max_output_change == pytest.approx(float(z.abs().max()) - 5.0, rel=1e-6) and not audit.clean
    assert clamp_audit(model, [x / 10]).clean


def test_input_files_npy_npz_and_torch_dict(tmp_path) -> None:
    a, b = np.random.randn(3, 2).astype(np.float64), np.random.randn(3, 4).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "ab.npz", first=a, second=b)
    torch.save({"first": torch.from_numpy(a), "second": torch.from_numpy(b)}, tmp_path / "ab.pt")
    assert torch.equal(load_input_file(tmp_path / "a.npy")[0], torch.from_numpy(a))
    for name in ("ab.npz", "ab.pt"):
        fitted = fit_inputs(load_input_file(tmp_path / name), [(1, 2), (1, 4)], name)
        assert [t.dtype for t in fitted] == [torch.float32, torch.float32]
        assert torch.equal(fitted[1], torch.from_numpy(b))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ([np.zeros((3, 2))], "holds 1 arrays but the model takes 2"),
        ([np.zeros((3, 2)), np.zeros((3, 5))], r"input 1 has shape \(3, 5\), expected \(N, 4\)"),
        ([np.zeros((3, 2)), np.full((3, 4), np.nan)], "input 1 contains NaN"),
    ],
)
def test_inputs_that_do_not_fit_are_bad_input(arrays, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        fit_inputs([torch.from_numpy(a) for a in arrays], [(1, 2), (1, 4)], "--inputs x.npz")


def test_unreadable_input_files_are_bad_input(tmp_path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    torch.save({"a": 1}, tmp_path / "notensor.pt")
    for name, message in [
        ("objects.npy", "cannot read it"),
        ("junk.pt", "cannot read it"),
        ("missing.npy", "no such file"),
        ("notensor.pt", "not a tensor"),
    ]:
        with pytest.raises(BadInputError, match=message):
            load_input_file(tmp_path / name)


@pytest.mark.parametrize("opset", [17, 24, 0])
def test_opset_out_of_range_is_bad_input(opset: int) -> None:
    with pytest.raises(BadInputError, match="out of range; choose 18 to 23"):
        ExportOptions(opset=opset)
