"""ExportOptions: every export option is checked in the library, and each Format has one exporter in one table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from onorm_convert import OnlineNorm1d, export_onnx, export_torch
from onorm_convert.errors import OptionError
from onorm_convert.export import EXPORTERS, Format, export_model
from onorm_convert.fold import FoldAction, fold, fold_with_report
from onorm_convert.options import MAX_OPSET, MIN_OPSET, ExportOptions

from test_fold import randomized

NOT_A_TOLERANCE = "must be a finite number >= 0"


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), randomized(OnlineNorm1d(4)), nn.ReLU()).eval()


@pytest.mark.parametrize("export", [export_onnx, export_torch])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("atol", -1, f"atol=-1: {NOT_A_TOLERANCE}"),
        ("rtol", math.nan, f"rtol=nan: {NOT_A_TOLERANCE}"),
        ("atol", math.inf, f"atol=inf: {NOT_A_TOLERANCE}"),
        ("rtol", "1e-3", f"rtol='1e-3': {NOT_A_TOLERANCE}"),
        ("atol", {"*": 1e-4, "output[0]": -1.0}, f"atol['output[0]']=-1.0: {NOT_A_TOLERANCE}"),
    ],
)
def test_the_library_refuses_bad_tolerances_naming_the_option(export, option: str, value, message: str, tmp_path):
    destination = tmp_path / "m.out"
    with pytest.raises(OptionError) as caught:
        export(small_model(), destination, [torch.randn(1, 6)], **{option: value})
    assert caught.value.option.startswith(option) and str(caught.value).startswith(message)
    assert caught.value.exit_code == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [5, MIN_OPSET - 1, MAX_OPSET + 1, 18.0, True])
def test_export_onnx_refuses_an_opset_out_of_range(opset, tmp_path) -> None:
    with pytest.raises(OptionError) as caught:
        export_onnx(small_model(), tmp_path / "m.onnx", [torch.randn(1, 6)], opset=opset)
    assert caught.value.option == "opset" and str(caught.value).startswith(f"opset={opset!r}: ")
    assert list(tmp_path.iterdir()) == []


def test_the_flag_form_is_what_the_cli_prints() -> None:
    with pytest.raises(OptionError) as caught:
        ExportOptions(atol=-1.0)
    assert caught.value.as_flag() == f"--atol -1.0: {NOT_A_TOLERANCE}, e.g. 1e-4"
    with pytest.raises(OptionError) as caught:
        ExportOptions(opset=5)
    assert caught.value.as_flag().startswith(f"--opset 5: out of range; choose {MIN_OPSET} to {MAX_OPSET}")


def test_in_range_options_are_kept_and_a_tolerance_mapping_is_frozen() -> None:
    per_output = {"*": 1e-4, "output[0]": 0.0}
    options = ExportOptions(opset=MAX_OPSET, atol=per_output, rtol=0)
    per_output["*"] = -1.0  # after the check: must not reach the export
    assert options.opset == MAX_OPSET and options.rtol == 0 and dict(options.atol) == {"*": 1e-4, "output[0]": 0.0}
    with pytest.raises(TypeError):
        options.atol["*"] = -1.0


def test_every_format_has_one_exporter_with_its_own_suffix() -> None:
    assert set(EXPORTERS) == set(Format)
    suffixes = [EXPORTERS[fmt].suffix for fmt in Format]
    assert all(suffix.startswith(".") and len(suffix) > 1 for suffix in suffixes) and len(set(suffixes)) == len(
        suffixes
    )
    assert [str(fmt) for fmt in Format] == [fmt.value for fmt in Format] == ["onnx", "torch"]


@pytest.mark.parametrize("fmt", list(Format))
def test_every_format_round_trips_through_its_exporter(fmt: Format, tmp_path) -> None:
    model = small_model()
    exporter = EXPORTERS[fmt]
    destination = tmp_path / f"m{exporter.suffix}"
    report = export_model(fmt, model, destination, [torch.randn(1, 6)], ExportOptions(strip_clamp=True))
    assert report.verification.passed and report.path == str(destination) and report.format is fmt
    assert json.loads(json.dumps(report.to_dict()))["format"] == fmt.value
    run, _ = exporter.runner(destination)
    x = torch.randn(5, 6)
    (output,) = run([x])
    torch.testing.assert_close(torch.from_numpy(output), fold(model, strip_clamp=True)(x), atol=1e-5, rtol=1e-4)


def test_fold_actions_read_as_their_values_in_tables_and_json() -> None:
    _, report = fold_with_report(small_model())
    assert report.count("folded") == report.count(FoldAction.FOLDED) == 1
    assert [f"{step.action}" for step in report.steps] == ["folded"]
    assert json.loads(json.dumps(report.to_dict()))["steps"][0]["action"] == "folded"
    assert [action.value for action in FoldAction] == ["folded", "affine", "kept"]
