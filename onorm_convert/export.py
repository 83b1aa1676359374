"""Fold, export and verify: a deployment artifact that provably computes what the model computes.

The pipeline: :func:`~onorm_convert.fold.fold_with_report` (normalization folded into the
producers, the clamp kept or stripped), ``torch.onnx.export`` (the torch.export-based
exporter, batch axis dynamic by default), ``onnx.checker``, then onnxruntime against the
PyTorch model in eval mode (clamp stripped from it too when stripped from the export).
The file is written to a temp file beside the destination and reaches the destination
only once it verified; on a mismatch it is removed, or kept under a clearly failed name.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BadInputError, VerificationError, first_line, quoted
from .files import publish, staged_file
from .fold import FoldReport, fold_with_report
from .inputs import run_model
from .shared import check_model_values, check_returns_tensors, strip_clamps
from .verify import (
    ClampAuditReport,
    Tolerance,
    VerifyReport,
    clamp_audit,
    flatten_outputs,
    verification_batches,
    verify_onnx,
    verify_outputs,
)

MIN_OPSET = 18  # the exporter's own operator library starts here; lower needs a lossy version conversion
MAX_OPSET = 23  # the highest the installed torch exporter targets (torch.onnx._constants.ONNX_MAX_OPSET)
ONNX, TORCH = "onnx", "torch"
FAILED_SUFFIX = ".verification-failed"


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_torch` did, step by step, with the figures."""

    path: str | None  # the published file; None when nothing was published
    format: str  # "onnx" | "torch"
    opset: int | None
    dynamic_batch: bool
    strip_clamp: bool
    fold: FoldReport
    input_shapes: list[tuple[int, ...]]
    verification: VerifyReport | None = None  # None: not verified (--no-verify)
    clamp_audit: ClampAuditReport | None = None  # only with strip_clamp and real inputs
    op_counts: dict[str, int] = field(default_factory=dict)  # ONNX op type -> count
    kept_failed: str | None = None  # where a file that failed verification was kept
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per step
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "path": self.path,
            "format": self.format,
            "opset": self.opset,
            "dynamic_batch": self.dynamic_batch,
            "strip_clamp": self.strip_clamp,
            "input_shapes": [list(shape) for shape in self.input_shapes],
            "fold": self.fold.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "clamp_audit": None if self.clamp_audit is None else self.clamp_audit.to_dict(),
            "op_counts": self.op_counts,
            "kept_failed": self.kept_failed,
            "seconds": {step: round(value, 3) for step, value in self.seconds.items()},
            "warnings": self.warnings,
        }


class ExportMismatchError(VerificationError):
    """The exported model does not match the PyTorch model; ``report`` holds the figures."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter cannot target."""
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInputError(
            f"--opset {opset}: out of range; choose {MIN_OPSET} to {MAX_OPSET} (or leave it out for the default)"
        )


def failed_path(destination: Path) -> Path:
    """Where ``--keep-failed`` keeps a file that failed verification: ``NAME.verification-failed.EXT`` beside it.

    An earlier failed file is never replaced: the first free ``NAME.verification-failed-K.EXT`` is used instead.
    """
    candidate = destination.with_name(destination.stem + FAILED_SUFFIX + destination.suffix)
    attempt = 1
    while os.path.lexists(candidate):
        attempt += 1
        candidate = destination.with_name(f"{destination.stem}{FAILED_SUFFIX}-{attempt}{destination.suffix}")
    return candidate


def op_type_counts(model_proto: Any) -> dict[str, int]:
    """ONNX op type -> number of nodes in the main graph, sorted by op type."""
    return dict(sorted(Counter(node.op_type for node in model_proto.graph.node).items()))


def dynamic_batch_shapes(example_inputs: Sequence[Tensor]) -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` making dim 0 of every input dynamic (one shared "batch" dim when the batches agree)."""
    batches = {t.shape[0] for t in example_inputs}
    if len(batches) == 1:
        batch = torch.export.Dim("batch")
        return tuple({0: batch} for _ in example_inputs)
    return tuple({0: torch.export.Dim(f"batch_{index}")} for index in range(len(example_inputs)))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's own log lines and deprecation notices (e.g. optional torchvision ops): not onorm's output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used")  # inputs sharing "batch"
            yield
    finally:
        logger.setLevel(level)


def to_onnx_proto(model: nn.Module, example_inputs: Sequence[Tensor], *, opset: int | None, dynamic_batch: bool) -> Any:
    """``torch.onnx.export`` of ``model`` (eval mode): the in-memory ONNX program."""
    dynamic_shapes = dynamic_batch_shapes(example_inputs) if dynamic_batch else None
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                model,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - an unexportable model is reported in one line
        hint = "; if the model fixes its batch size, retry with --static-batch" if dynamic_batch else ""
        raise BadInputError(
            f"torch.onnx.export failed: {first_line(err)}{hint} (rerun with --debug for details)"
        ) from err


def _reference(model: nn.Module, strip_clamp: bool) -> nn.Module:
    """The eval-mode PyTorch model the export must match (clamp stripped when it is stripped from the export)."""
    return strip_clamps(model) if strip_clamp else copy.deepcopy(model).eval()


def _finish(staged: Path, destination: Path, report: ExportReport, keep_failed: bool, replace: bool) -> ExportReport:
    """Publish ``staged`` if it verified (or was not verified); else keep it aside or drop it and raise."""
    if report.verification is None or report.verification.passed:
        publish(staged, destination, replace=replace)
        report.path = str(destination)
        return report
    message = report.verification.summary()
    if keep_failed:
        kept = failed_path(destination)
        publish(staged, kept, replace=False)  # never an earlier failed file
        report.kept_failed = str(kept)
        message += f"; the failed file was kept as {quoted(kept)}"
    else:
        message += f"; nothing was written to {quoted(destination)}"
    raise ExportMismatchError(message, report)


def export_onnx(
    model: nn.Module,
    path: Path | str,
    example_inputs: Sequence[Tensor],
    *,
    strip_clamp: bool = False,
    opset: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: Tolerance = 1e-4,
    rtol: Tolerance = 1e-3,
    real_inputs: Sequence[Tensor] | None = None,
    keep_failed: bool = False,
    replace: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Fold ``model``, export it to ONNX at ``path`` and verify it with onnxruntime.

    Args:
        model: the PyTorch model; never modified.
        path: the destination; written (replaced) only once the export verified.
        example_inputs: one tensor per model input; their shapes are the declared shapes.
        strip_clamp: remove OnlineNorm's activation clamp (from the export and the reference).
        opset: ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`; None for the exporter's default.
        dynamic_batch: make dim 0 of every input dynamic.
        verify: compare with onnxruntime; when False the file is published unverified.
        atol, rtol: tolerances, one for all outputs or a dict per output label (``"*"`` the default).
        real_inputs: real inputs to verify on too (any batch size); with ``strip_clamp`` they feed the clamp audit.
        keep_failed: keep a file that failed verification as ``NAME.verification-failed.onnx``.
        replace: replace a file at ``path``; when False, a file there (even one that appeared while
            exporting) is left alone and the export fails with BadInputError.
        progress: called with a short line before each step.

    Returns:
        The :class:`ExportReport`. Raises :class:`ExportMismatchError` (exit 1) on a mismatch
        and :class:`~onorm_convert.errors.BadInputError` (exit 2) for unusable inputs.
    """
    return _export(
        ONNX,
        model,
        Path(path),
        example_inputs,
        strip_clamp,
        opset,
        dynamic_batch,
        verify,
        atol,
        rtol,
        real_inputs,
        keep_failed,
        replace,
        progress,
    )


def export_torch(
    model: nn.Module,
    path: Path | str,
    example_inputs: Sequence[Tensor],
    *,
    strip_clamp: bool = False,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: Tolerance = 1e-4,
    rtol: Tolerance = 1e-3,
    real_inputs: Sequence[Tensor] | None = None,
    keep_failed: bool = False,
    replace: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Like :func:`export_onnx`, but writes the folded model as a ``torch.export`` program (``.pt2``).

    It loads with ``torch.export.load`` (no unpickling) for runtimes other than ONNX;
    verification runs the reloaded program against the PyTorch model.
    """
    return _export(
        TORCH,
        model,
        Path(path),
        example_inputs,
        strip_clamp,
        None,
        dynamic_batch,
        verify,
        atol,
        rtol,
        real_inputs,
        keep_failed,
        replace,
        progress,
    )


def _export(
    fmt: str,
    model: nn.Module,
    destination: Path,
    example_inputs: Sequence[Tensor],
    strip_clamp: bool,
    opset: int | None,
    dynamic_batch: bool,
    verify: bool,
    atol: Tolerance,
    rtol: Tolerance,
    real_inputs: Sequence[Tensor] | None,
    keep_failed: bool,
    replace: bool,
    progress: Callable[[str], None] | None,
) -> ExportReport:
    say = progress or (lambda text: None)
    check_opset(opset)
    example_inputs = list(example_inputs)
    shapes = [tuple(t.shape) for t in example_inputs]
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    say("folding normalization layers")
    reference = _reference(model, strip_clamp)
    check_returns_tensors(
        run_model(reference, example_inputs)
    )  # fails early, naming the layer, when the model rejects the inputs
    folded, fold_report = fold_with_report(model, strip_clamp=strip_clamp, example_inputs=example_inputs)
    check_model_values(model, "exporting")  # what verification cannot see: --no-verify would publish it
    seconds["fold"] = time.perf_counter() - start
    report = ExportReport(None, fmt, opset, dynamic_batch, strip_clamp, fold_report, shapes, seconds=seconds)
    if not fold_report.traced:
        report.warnings.append(f"normalization layers were not folded into their producers: {fold_report.trace_error}")

    with staged_file(destination, suffix=destination.suffix) as staged:
        start = time.perf_counter()
        if fmt == ONNX:
            say(f"exporting to ONNX (opset {opset or 'default'}, {'dynamic' if dynamic_batch else 'static'} batch)")
            program = to_onnx_proto(folded, example_inputs, opset=opset, dynamic_batch=dynamic_batch)
            program.save(str(staged), external_data=False)
            report.op_counts = op_type_counts(program.model_proto)
            report.opset = _default_opset(program.model_proto)
            _check_onnx(staged)
        else:
            say(f"exporting to a torch.export program ({'dynamic' if dynamic_batch else 'static'} batch)")
            _save_torch_program(folded, example_inputs, staged, dynamic_batch)
        seconds["export"] = time.perf_counter() - start

        if verify:
            start = time.perf_counter()
            say("verifying against the PyTorch model")
            batches = verification_batches(shapes, dynamic_batch=dynamic_batch, real_inputs=real_inputs)
            if fmt == ONNX:
                report.verification = verify_onnx(staged, reference, batches, atol=atol, rtol=rtol)
            else:
                run, runtime = _torch_program_runner(staged)
                report.verification = verify_outputs(reference, run, runtime, batches, atol=atol, rtol=rtol)
            seconds["verify"] = time.perf_counter() - start
        else:
            report.warnings.append(
                "verification skipped (--no-verify): the exported model was not compared with PyTorch"
            )

        if strip_clamp and real_inputs is not None:
            say("auditing the stripped clamps on the real inputs")
            report.clamp_audit = clamp_audit(model, real_inputs)
            if not report.clamp_audit.clean:
                report.warnings.append(_clamp_warning(report.clamp_audit))
        return _finish(staged, destination, report, keep_failed, replace)


def _clamp_warning(audit: ClampAuditReport) -> str:
    cut = [a for a in audit.layers if a.clipped]
    layers = ", ".join(f"{a.layer} {a.fraction:.3%}" for a in cut[:5]) + (
        f" and {len(cut) - 5} more" if len(cut) > 5 else ""
    )
    return f"stripping the clamp changes outputs on the real inputs by up to {audit.max_output_change:.3g}" + (
        f"; activations the clamp would cut: {layers}" if cut else ""
    )


def _default_opset(model_proto: Any) -> int | None:
    return next((entry.version for entry in model_proto.opset_import if entry.domain in ("", "ai.onnx")), None)


def _check_onnx(path: Path) -> None:
    """``onnx.checker`` on the written file; a failure is an exporter bug, reported as a failed verification."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise VerificationError(f"the exported ONNX model fails onnx.checker: {first_line(err)}") from err


def _save_torch_program(model: nn.Module, example_inputs: Sequence[Tensor], path: Path, dynamic_batch: bool) -> None:
    dynamic_shapes = dynamic_batch_shapes(example_inputs) if dynamic_batch else None
    try:
        # As torch.onnx.export does: a batch of 1 in the example must not specialize the batch dim.
        with _quiet_exporter(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as err:  # noqa: BLE001 - an unexportable model is reported in one line
        hint = "; if the model fixes its batch size, retry with --static-batch" if dynamic_batch else ""
        raise BadInputError(f"torch.export failed: {first_line(err)}{hint} (rerun with --debug for details)") from err
    buffer = io.BytesIO()  # torch.export.save insists on a ".pt2" name; the staged file is ".pt2.tmp"
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getvalue())


def _torch_program_runner(path: Path) -> tuple[Callable[[Sequence[Tensor]], list], str]:
    """Run the saved program at ``path`` as a fresh load would (no unpickling); loaded at the first run,
    so a program that does not load fails verification like a wrong output."""
    loaded: list[nn.Module] = []

    def run(inputs: Sequence[Tensor]) -> list:
        if not loaded:
            loaded.append(torch.export.load(io.BytesIO(path.read_bytes())).module())
        with torch.no_grad():
            return [value for _, value in flatten_outputs(loaded[0](*inputs))]

    return run, f"torch.export program (torch {torch.__version__})"
