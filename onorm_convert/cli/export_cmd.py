"""``onorm export``: fold, (optionally) strip the clamp, export to ONNX, and prove the outputs match."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import EXIT_MISMATCH, EXIT_OK, BadInputError, quoted
from ..export import EXPORTERS, ExportMismatchError, ExportReport, ExportWarning, Format, export_model
from ..files import check_output_path
from ..fold import FoldAction
from ..inputs import fit_inputs, load_input_file, random_inputs
from ..options import ExportOptions
from ..verify import OutputCheck
from .app import Console, app, format_table, report_error, run_command
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    DebugOpt,
    ForceOpt,
    InputShapeOpt,
    InputsOpt,
    JsonOpt,
    KeyOpt,
    ModelArg,
    OutputOpt,
    TrustOpt,
    load_for_cli,
    parse_input_shapes,
)

FOLD_COLUMNS = ("layer", "type", "action", "into", "error compensation", "why not folded")
CHECK_COLUMNS = (
    "batch", "output", "shape", "abs err p50/p99/max", "rel err p50/p99/max", "atol", "rtol",
    "passes by", "smallest atol/rtol", "top-1/top-5", "result",
)  # fmt: skip
AUDIT_COLUMNS = ("layer", "clamp", "activations cut", "fraction", "largest change")


@app.command()
def export(
    model: ModelArg,
    output: OutputOpt = None,
    strip_clamp: Annotated[
        bool, typer.Option("--strip-clamp", help="Remove OnlineNorm's activation clamp for inference.")
    ] = False,
    input_shape: InputShapeOpt = None,
    inputs: InputsOpt = None,
    opset: Annotated[
        int | None,
        typer.Option("--opset", help="ONNX opset (18-23); the exporter's default if not given.", show_default=False),
    ] = None,
    static_batch: Annotated[
        bool, typer.Option("--static-batch", help="Fix the batch size to the one in --input-shape.")
    ] = False,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance of the verification.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance of the verification.")] = 1e-3,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the onnxruntime check (not recommended).")
    ] = False,
    keep_failed: Annotated[
        bool,
        typer.Option("--keep-failed", help="Keep a file that failed verification as NAME.verification-failed.EXT."),
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="onnx, or torch for a torch.export program (.pt2).")
    ] = Format.ONNX.value,
    save_failing: Annotated[
        Path | None,
        typer.Option(
            "--save-failing",
            metavar="DIR",
            help="On a verification failure, save each failing batch (inputs and both outputs) as .npz in DIR.",
            show_default=False,
        ),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fold the normalization layers and export a model whose outputs are proven to match PyTorch's."""

    def body(console: Console) -> tuple[int, dict[str, Any]]:
        file_format = parse_format(fmt)
        options = ExportOptions(
            strip_clamp=strip_clamp, opset=opset, dynamic_batch=not static_batch, verify=not no_verify,
            atol=atol, rtol=rtol, keep_failed=keep_failed, replace=force,
        )  # fmt: skip
        shapes = parse_input_shapes(input_shape)
        loaded = load_for_cli(console, model, arch, arch_kwargs, key, trust)
        shapes = shapes or loaded.input_shapes
        if not shapes:
            raise BadInputError(
                f"{quoted(model)}: the file records no input shape; pass --input-shape, e.g. --input-shape 1,3,224,224"
            )
        sources = [model] if inputs is None else [model, inputs]
        destination = check_output_path(output or model.with_suffix(EXPORTERS[file_format].suffix), sources, force)
        real = (
            None
            if inputs is None
            else fit_inputs(load_input_file(inputs), shapes, f"--inputs {quoted(inputs)}", static_batch)
        )
        header = {"input": str(model), "input_format": loaded.format, "output": str(destination)}
        progress = StepProgress(console)
        try:
            with warnings.catch_warnings():  # shown from the report, with the rest of it
                warnings.simplefilter("ignore", ExportWarning)
                report = export_model(
                    file_format, loaded.module, destination, random_inputs(shapes), options,
                    real_inputs=real, progress=progress, save_failing=save_failing,
                )  # fmt: skip
        except ExportMismatchError as err:
            progress.done()
            show_report(console, err.report)
            error = report_error("export", str(err), type(err).__name__)
            result = {**header, **err.report.to_dict(), "error": error}
            return EXIT_MISMATCH, result
        progress.done()
        show_report(console, report)
        verdict = "verified" if report.verification is not None else "NOT verified"
        console.print(f"exported ({verdict}) -> {destination}")
        return EXIT_OK, {**header, **report.to_dict()}

    run_command("export", json_mode, debug, body)


def parse_format(text: str) -> Format:
    """The :class:`Format` ``--format`` names; an unknown one is a BadInputError."""
    try:
        return Format(text)
    except ValueError:
        raise BadInputError(f"--format {text!r}: expected {' or '.join(Format)}") from None


class StepProgress:
    """Export's progress lines; on a terminal each is prefixed with the time since the export began, and ends with one for the last step.

    On a pipe, or under --json, the lines are exactly the console's.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.timed = not console.json_mode and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        """Announce a step."""
        self.console.progress(self._stamped(text) if self.timed else text)

    def done(self) -> None:
        """Close the last step: on a terminal, say when it ended."""
        if self.timed:
            self.console.progress(self._stamped("done"))

    def _stamped(self, text: str) -> str:
        return f"[{time.perf_counter() - self.start:6.1f} s] {text}"


def check_row(check: OutputCheck) -> tuple[str, ...]:
    """One row of the verification table."""

    def figures(*values: float | None) -> str:
        return "/".join("-" if value is None else f"{value:.3g}" for value in values)

    return (
        check.batch, check.output, "x".join(map(str, check.shape)),
        figures(check.abs_p50, check.abs_p99, check.max_abs), figures(check.rel_p50, check.rel_p99, check.max_rel),
        f"{check.atol:g}", f"{check.rtol:g}", check.passes_by or "-", figures(check.min_atol, check.min_rtol),
        _agreement(check.top1, check.top5), "ok" if check.passed else f"FAIL: {check.problem}",
    )  # fmt: skip


def _agreement(*fractions: float | None) -> str:
    """Top-k agreements as percentages; "-" where there are none (not logits)."""
    shown = [f"{fraction:.1%}" for fraction in fractions if fraction is not None]
    return "/".join(shown) or "-"


def show_report(console: Console, report: ExportReport) -> None:
    """The fold table, the verification figures, the clamp audit and every warning."""
    steps = report.fold.steps
    rows = [(s.norm, s.kind, s.action, s.into or "-", s.ecm, s.reason or "-") for s in steps]
    for line in format_table(FOLD_COLUMNS, rows):
        console.print(line)
    folded = report.fold.count(FoldAction.FOLDED)
    console.print(f"folded {folded} of {len(steps)} normalization layers into their producers")
    if report.opset is not None:
        console.print(f"ONNX opset {report.opset}")
    if report.op_counts:
        console.print("ONNX ops: " + ", ".join(f"{op} {count}" for op, count in report.op_counts.items()))
    if report.verification is not None:
        console.print()
        for line in format_table(CHECK_COLUMNS, [check_row(check) for check in report.verification.checks]):
            console.print(line)
        console.print(report.verification.summary())
        console.print(TOLERANCE_NOTE)
    if report.clamped_agreement is not None:
        console.print(clamped_agreement_line(report))
    for path in report.saved_failing:
        console.print(f"failing batch saved -> {path}")
    if report.clamp_audit is not None and not report.clamp_audit.layers:
        console.print("clamp audit: the model has no clamped OnlineNorm layer")
    elif report.clamp_audit is not None:
        rows = [
            (a.layer, f"±{a.clamp_bound:g}", f"{a.clipped}/{a.activations}", f"{a.fraction:.4%}", f"{a.max_change:.3g}")
            for a in report.clamp_audit.layers
        ]
        console.print()
        for line in format_table(AUDIT_COLUMNS, rows):
            console.print(line)
        console.print(
            f"clamp audit: stripping changes the outputs on the real inputs by at most {report.clamp_audit.max_output_change:.3g}"
        )
    for warning in report.warnings:
        console.warn(warning)


TOLERANCE_NOTE = (
    "an element passes when |exported - PyTorch| <= atol + rtol * |PyTorch|: "
    "'passes by' names the tolerance that carried it, 'smallest atol/rtol' what would still pass with the other as given"
)


def clamped_agreement_line(report: ExportReport) -> str:
    """The stripped export against the clamped (trained) model, per batch: informational, never a failure."""
    agreement = report.clamped_agreement
    batches = "; ".join(
        f"{batch.batch}: max abs diff {batch.max_abs_diff:.3g}"
        + ("" if batch.top1_agreement is None else f", top-1 agreement {batch.top1_agreement:.2%}")
        for batch in agreement.batches
    )
    return f"against {agreement.reference} (for information, not verified): {batches or 'no batch compared'}"
