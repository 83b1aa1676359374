"""What a user sees of a verification: the error figures, saved failures, a stripped export's second reference, the demo summary."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import Liar, trained_sample
from torch import nn

from onorm_convert import convert, export_onnx, export_torch, save_checkpoint
from onorm_convert.cli.export_cmd import StepProgress, check_row
from onorm_convert.export import CLAMPED_REFERENCE, STRIPPED_REFERENCE, ExportMismatchError
from onorm_convert.verify import compare_arrays, compare_outputs, topk_agreement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sample_models lives at the repository root, outside the installed package
from sample_models import demo_summary  # noqa: E402

ATOL, RTOL = 1e-4, 1e-3


def one_check(reference: np.ndarray, candidate: np.ndarray, atol: float = ATOL, rtol: float = RTOL):
    (check,) = compare_outputs("b", [("output", reference)], [candidate], atol, rtol)
    return check


def test_a_large_relative_error_passing_through_atol_is_named() -> None:
    # The row: rel err 0.005 against rtol 0.001 "ok", because atol carries it.
    reference = np.array([0.01, 1.0], dtype=np.float32)
    check = one_check(reference, reference + np.array([5e-5, 0.0], dtype=np.float32))
    assert check.passed and check.max_rel == pytest.approx(0.005, rel=1e-3)
    assert check.passes_by == "atol"
    assert check.min_rtol == pytest.approx(0.0) and check.min_atol == pytest.approx(5e-5 - RTOL * 0.01, rel=1e-3)


@pytest.mark.parametrize(
    ("errors", "passes_by"),
    [([0.0, 0.0], "atol or rtol"), ([0.5, 0.0], "rtol"), ([0.5, 5e-5], "atol + rtol"), ([2.0, 0.0], "")],
)
def test_passes_by_names_the_tolerance_that_carries_the_pass(errors: list[float], passes_by: str) -> None:
    reference = np.array([1000.0, 0.001])
    check = one_check(reference, reference + np.array(errors))
    assert check.passes_by == passes_by and check.passed == bool(passes_by)


def test_the_smallest_tolerances_are_the_ones_that_just_pass() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(200) * 10
    candidate = reference + rng.standard_normal(200) * 1e-3
    check = one_check(reference, candidate)
    assert compare_arrays(reference, candidate, check.min_atol * (1 + 1e-9), RTOL)[2]
    assert not compare_arrays(reference, candidate, check.min_atol * (1 - 1e-6), RTOL)[2]
    assert compare_arrays(reference, candidate, ATOL, check.min_rtol * (1 + 1e-9))[2]
    assert not compare_arrays(reference, candidate, ATOL, check.min_rtol * (1 - 1e-6))[2]


def test_no_rtol_passes_an_error_beyond_atol_where_the_reference_is_zero() -> None:
    check = one_check(np.array([0.0, 1.0]), np.array([1e-3, 1.0]))
    assert check.min_rtol == float("inf") and check.min_atol == pytest.approx(1e-3)


def test_percentiles_of_the_absolute_and_relative_errors() -> None:
    reference = np.arange(1, 101, dtype=np.float64)
    errors = np.linspace(0, 1e-2, 100)
    check = one_check(reference, reference + errors, atol=1.0)
    abs_errors = np.abs((reference + errors) - reference)
    assert check.abs_p50 == pytest.approx(np.percentile(abs_errors, 50))
    assert check.abs_p99 == pytest.approx(np.percentile(abs_errors, 99))
    assert check.rel_p99 == pytest.approx(np.percentile(abs_errors / reference, 99))
    assert check.abs_p50 <= check.abs_p99 <= check.max_abs and check.rel_p50 <= check.rel_p99 <= check.max_rel


def test_top1_and_top5_agreement_for_logits_only() -> None:
    logits = np.tile(np.arange(6, dtype=np.float32), (4, 1))  # every row: class 5 first, classes 1-5 the top five
    candidate = logits.copy()
    candidate[0, [4, 5]] = candidate[0, [5, 4]]  # row 0: another top-1, the same top five
    candidate[1, [0, 1]] = candidate[1, [1, 0]]  # row 1: the same top-1, another top five
    check = one_check(logits, candidate, atol=10)
    assert check.top1 == 0.75 and check.top5 == 0.75
    assert topk_agreement(logits[:, :3], candidate[:, :3], 5) is None  # fewer than 5 classes: no top-5
    assert topk_agreement(logits[:, :3], candidate[:, :3], 1) == 1.0
    assert one_check(logits[:, :1], candidate[:, :1]).top1 is None  # (N, 1): not logits
    assert one_check(logits[0], candidate[0], atol=10).top1 is None  # 1-D: not logits


def test_a_failed_comparison_has_no_figures() -> None:
    check = one_check(np.array([1.0, np.nan]), np.array([1.0, 1.0]))
    assert not check.passed and np.isnan(check.abs_p99) and check.passes_by == "" and check.top1 is None


def test_the_text_table_shows_what_carried_the_pass() -> None:
    reference = np.array([[0.01, 1.0]], dtype=np.float32)
    row = check_row(one_check(reference, reference + np.array([[5e-5, 0.0]], dtype=np.float32)))
    assert row[7] == "atol" and row[9] == "100.0%" and row[-1] == "ok"
    assert row[4].split("/")[-1] == "0.005"  # the max relative error, beside its percentiles


def test_export_takes_a_bare_tensor_as_the_example_input(tmp_path: Path) -> None:
    model = convert(trained_sample("digits_mlp"))
    x = torch.randn(2, 64)
    onnx_report = export_onnx(model, tmp_path / "m.onnx", x, real_inputs=torch.randn(5, 64))
    torch_report = export_torch(model, tmp_path / "m.pt2", x)
    assert onnx_report.input_shapes == torch_report.input_shapes == [(2, 64)]
    assert onnx_report.verification.passed and torch_report.verification.passed
    assert "real inputs (batch 5)" in {check.batch for check in onnx_report.verification.checks}


def test_a_failed_verification_saves_each_failing_batch(tmp_path: Path) -> None:
    folder = tmp_path / "failing" / "here"  # created, parents too
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ExportMismatchError) as caught:
        export_torch(Liar().eval(), tmp_path / "liar.pt2", x, save_failing=folder)
    saved = caught.value.report.saved_failing
    assert [Path(p).name for p in saved] == ["failing-random-batch-1.npz", "failing-random-batch-2.npz"]
    assert all(path in str(caught.value) for path in saved)
    with np.load(saved[0]) as batch:
        assert batch["input_0"].shape == (1, 3, 6, 6) and list(batch["output_labels"]) == ["output"]
        assert np.allclose(batch["candidate_0"] - batch["reference_0"], 0.01, atol=1e-5)
    first = Path(saved[0]).read_bytes()

    with pytest.raises(ExportMismatchError) as again:
        export_torch(Liar().eval(), tmp_path / "liar.pt2", x, save_failing=folder)
    assert [Path(p).name for p in again.value.report.saved_failing] == [
        "failing-random-batch-1-2.npz",
        "failing-random-batch-2-2.npz",
    ]  # never over the earlier files
    assert Path(saved[0]).read_bytes() == first


def test_nothing_is_saved_when_verification_passes(tmp_path: Path) -> None:
    report = export_torch(nn.Linear(4, 3).eval(), tmp_path / "m.pt2", torch.randn(2, 4), save_failing=tmp_path / "f")
    assert report.saved_failing == [] and not (tmp_path / "f").exists()


def test_a_stripped_export_says_what_it_was_verified_against_and_compares_the_clamped_model(tmp_path: Path) -> None:
    model = convert(trained_sample("digits_mlp"))
    report = export_torch(model, tmp_path / "m.pt2", torch.randn(2, 64), strip_clamp=True)
    assert report.verification.reference == STRIPPED_REFERENCE
    agreement = report.clamped_agreement
    assert agreement.reference == CLAMPED_REFERENCE
    assert [batch.batch for batch in agreement.batches] == ["random batch 1", "random batch 2"]
    assert all(batch.max_abs_diff > 0 and batch.top1_agreement is not None for batch in agreement.batches)
    assert any("random inputs only" in warning and CLAMPED_REFERENCE in warning for warning in report.warnings)
    assert report.to_dict()["clamped_agreement"]["batches"][0]["samples"] == 1
    assert report.to_dict()["verification"]["reference"] == STRIPPED_REFERENCE


def test_a_kept_clamp_has_no_second_reference(tmp_path: Path) -> None:
    report = export_torch(convert(trained_sample("digits_mlp")), tmp_path / "m.pt2", torch.randn(2, 64))
    assert report.verification.reference == "the PyTorch model" and report.clamped_agreement is None


class FakeConsole:
    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.lines: list[str] = []

    def progress(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize("tty", [False, True])
def test_progress_lines_are_timed_on_a_terminal_only(monkeypatch, tty: bool) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    console = FakeConsole()
    progress = StepProgress(console)
    progress("folding normalization layers")
    progress.done()
    if tty:
        assert console.lines[0].endswith("s] folding normalization layers") and console.lines[1].endswith("s] done")
    else:
        assert console.lines == ["folding normalization layers"]


def test_the_demo_summary_counts_accuracy_and_changed_predictions() -> None:
    labels = np.array([0, 1, 2, 1])
    original = np.eye(3)[[0, 1, 2, 2]]  # 3 of 4 right
    changed = np.eye(3)[[0, 1, 2, 1]]  # the last prediction changed, and is now right
    lines = demo_summary.summary_lines({"original": original, "converted": original, "onnx": changed}, labels)
    assert lines[0] == "accuracy on the 4 held-out digits:"
    assert [line.split()[-1] for line in lines[1:4]] == ["75.00%", "75.00%", "100.00%"]
    assert lines[4] == "predictions that differ from the original's: converted 0, onnx 1 (of 4)"
    note = " ".join(demo_summary.clamp_note(original, changed))
    assert "at most 1" in note and "changes 1 predictions" in note


def test_the_demo_summary_runs_on_a_demo_folder(tmp_path: Path, capsys) -> None:
    digits = demo_summary.load_digits_split()[2][:20]
    np.save(tmp_path / "digits_test.npy", demo_summary.models.shape_digits("digits_resnet", digits).numpy())
    converted = convert(trained_sample("digits_resnet"))
    save_checkpoint(converted, tmp_path / "digits_resnet_onorm.pt", arch="sample_models.models:digits_resnet")
    export_onnx(converted, tmp_path / "digits_resnet.onnx", torch.randn(1, 1, 8, 8), strip_clamp=True, verify=False)
    demo_summary.main(tmp_path)
    out = capsys.readouterr().out
    assert "digits_resnet.onnx" in out and "accuracy on the 20 held-out digits" in out
    assert "predictions that differ from the BatchNorm original's" in out


def test_an_exports_warnings_are_python_warnings_too_and_the_cli_shows_each_once(tmp_path):
    from onorm_convert.export import ExportWarning

    from conftest import MLP, MLP_ARCH, onorm

    model = convert(trained_sample("digits_mlp"))
    with pytest.warns(ExportWarning, match="verification skipped"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64), verify=False)
    result = onorm(
        "export", MLP, "--arch", MLP_ARCH, "--input-shape", "2,64", "--no-verify", "-o", tmp_path / "cli.onnx"
    )
    assert result.exit_code == 0 and result.stderr.count("verification skipped") == 1
