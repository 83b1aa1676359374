"""Fold, export and verify: a deployment artifact that provably computes what the model computes.

The pipeline: :func:`~onorm_convert.fold.fold_with_report` (normalization folded into the
producers, the clamp kept or stripped), the format's exporter (:data:`EXPORTERS`: ONNX through
``torch.onnx.export`` and ``onnx.checker``, or a ``torch.export`` program; batch axis dynamic by
default), then the written file, loaded as its runtime loads it, against the PyTorch model in
eval mode (clamp stripped from it too when stripped from the export).
The file is written to a temp file beside the destination and reaches the destination
only once it verified; on a mismatch it is removed, or kept under a clearly failed name, and
the failing batches can be saved (``save_failing``). A stripped export is verified against the
stripped model (what it computes), and compared with the clamped (trained) model on the same
batches too, for information.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .errors import BadInputError, VerificationError, first_line, quoted
from .files import data_file, publish_with_data, staged_folder
from .fold import FoldReport, fold_with_report
from .inputs import run_model
from .options import ExportOptions
from .shared import check_model_values, check_returns_tensors, strip_clamps
from .verify import (
    AgreementMeter,
    BatchResult,
    ClampAuditReport,
    ReferenceAgreement,
    Tolerance,
    VerifyReport,
    clamp_audit,
    flatten_outputs,
    onnxruntime_runner,
    verification_batches,
    verify_outputs,
)

FAILED_SUFFIX = ".verification-failed"
EXTERNAL_DATA_BYTES = 3 * 2**29  # 1.5 GiB, torch's own threshold: past it the weights go to NAME.onnx.data
Runner = Callable[[Sequence[Tensor]], list]  # runs the written file on one batch: its outputs, flattened
ExampleInputs = Tensor | Sequence[Tensor]  # one tensor per model input; a bare tensor for a one-input model
STRIPPED_REFERENCE = "the PyTorch model with the clamp stripped"
CLAMPED_REFERENCE = "the PyTorch model with its clamp (as trained)"


class Format(str, Enum):
    """The formats :func:`export_model` writes; each value is the CLI's ``--format`` and the report's ``format``."""

    ONNX = "onnx"
    TORCH = "torch"

    def __str__(self) -> str:
        return self.value  # "onnx", not "Format.ONNX", in str() and (from Python 3.12) f-strings


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_torch` did, step by step, with the figures."""

    path: str | None  # the published file; None when nothing was published
    format: Format
    opset: int | None
    dynamic_batch: bool
    strip_clamp: bool
    fold: FoldReport
    input_shapes: list[tuple[int, ...]]
    verification: VerifyReport | None = None  # None: not verified (--no-verify)
    clamp_audit: ClampAuditReport | None = None  # only with strip_clamp and real inputs
    clamped_agreement: ReferenceAgreement | None = None  # only with strip_clamp: the export against the clamped model
    saved_failing: list[str] = field(default_factory=list)  # the .npz files of the failing batches (save_failing)
    op_counts: dict[str, int] = field(default_factory=dict)  # ONNX op type -> count
    kept_failed: str | None = None  # where a file that failed verification was kept
    data_path: str | None = None  # the published external data file (NAME.onnx.data), for weights past 1.5 GiB
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per step
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "path": self.path,
            "data_path": self.data_path,
            "format": self.format,
            "opset": self.opset,
            "dynamic_batch": self.dynamic_batch,
            "strip_clamp": self.strip_clamp,
            "input_shapes": [list(shape) for shape in self.input_shapes],
            "fold": self.fold.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "clamp_audit": None if self.clamp_audit is None else self.clamp_audit.to_dict(),
            "clamped_agreement": None if self.clamped_agreement is None else self.clamped_agreement.to_dict(),
            "saved_failing": self.saved_failing,
            "op_counts": self.op_counts,
            "kept_failed": self.kept_failed,
            "seconds": {step: round(value, 3) for step, value in self.seconds.items()},
            "warnings": self.warnings,
        }


class ExportWarning(UserWarning):
    """Something an export's report warns of (an unfolded layer, an unverified file, a clamp that changes outputs)."""


class ExportMismatchError(VerificationError):
    """The exported model does not match the PyTorch model; ``report`` holds the figures."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


def _refer_to_data(model: Path, location: str) -> None:
    """Rewrite ``model``'s references to its external data file to ``location`` (a name beside it)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model))


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


@dataclass(frozen=True)
class WrittenFile:
    """What writing the file revealed: the ONNX opset and op counts (None and empty for other formats)."""

    opset: int | None = None
    op_counts: dict[str, int] = field(default_factory=dict)


class Exporter(Protocol):
    """One format: how :func:`export_model` writes the folded model and loads the file to verify it."""

    suffix: str  # the destination's usual suffix, e.g. ".onnx"

    def describe(self, options: ExportOptions) -> str:
        """What is written, for the progress line: ``exporting to <this>``."""
        ...

    def write(
        self, model: nn.Module, example_inputs: Sequence[Tensor], path: Path, options: ExportOptions
    ) -> WrittenFile:
        """Export ``model`` (folded, eval mode) to ``path``; an unexportable model is a BadInputError."""
        ...

    def runner(self, path: Path) -> tuple[Runner, str]:
        """A function running the file at ``path`` as its runtime would, and a description of that runtime."""
        ...


class OnnxExporter:
    """ONNX through ``torch.onnx.export``, checked by ``onnx.checker``, run on onnxruntime (CPU)."""

    suffix = ".onnx"

    def describe(self, options: ExportOptions) -> str:
        opset = f"opset {options.opset}" if options.opset else "the exporter's default opset"
        return f"ONNX ({opset}, {_batch_kind(options)} batch)"

    def write(
        self, model: nn.Module, example_inputs: Sequence[Tensor], path: Path, options: ExportOptions
    ) -> WrittenFile:
        program = to_onnx_proto(model, example_inputs, opset=options.opset, dynamic_batch=options.dynamic_batch)
        # Weights past the threshold go to NAME.onnx.data beside the file (protobuf stops at 2 GiB).
        program.save(str(path), external_data=_weight_bytes(model) > EXTERNAL_DATA_BYTES)
        written = WrittenFile(_default_opset(program.model_proto), op_type_counts(program.model_proto))
        _check_onnx(path)
        return written

    def runner(self, path: Path) -> tuple[Runner, str]:
        return onnxruntime_runner(path)


class TorchProgramExporter:
    """A ``torch.export`` program (``.pt2``), run as ``torch.export.load`` gives it back (no unpickling)."""

    suffix = ".pt2"

    def describe(self, options: ExportOptions) -> str:
        return f"a torch.export program ({_batch_kind(options)} batch)"

    def write(
        self, model: nn.Module, example_inputs: Sequence[Tensor], path: Path, options: ExportOptions
    ) -> WrittenFile:
        dynamic_shapes = dynamic_batch_shapes(example_inputs) if options.dynamic_batch else None
        try:
            # As torch.onnx.export does: a batch of 1 in the example must not specialize the batch dim.
            with _quiet_exporter(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
                program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
        except Exception as err:  # noqa: BLE001 - an unexportable model is reported in one line
            hint = "; if the model fixes its batch size, retry with --static-batch" if options.dynamic_batch else ""
            raise BadInputError(
                f"torch.export failed: {first_line(err)}{hint} (rerun with --debug for details)"
            ) from err
        buffer = io.BytesIO()  # torch.export.save insists on a ".pt2" name; the staged file is ".pt2.tmp"
        torch.export.save(program, buffer)
        path.write_bytes(buffer.getvalue())
        return WrittenFile()

    def runner(self, path: Path) -> tuple[Runner, str]:
        """Loaded at the first run, so a program that does not load fails verification like a wrong output."""
        loaded: list[nn.Module] = []

        def run(inputs: Sequence[Tensor]) -> list:
            if not loaded:
                loaded.append(torch.export.load(io.BytesIO(path.read_bytes())).module())
            with torch.no_grad():
                return [value for _, value in flatten_outputs(loaded[0](*inputs))]

        return run, f"torch.export program (torch {torch.__version__})"


# The one table of formats: the library exports through it, the CLI takes its suffixes from it.
EXPORTERS: Mapping[Format, Exporter] = MappingProxyType(
    {Format.ONNX: OnnxExporter(), Format.TORCH: TorchProgramExporter()}
)


def _batch_kind(options: ExportOptions) -> str:
    return "dynamic" if options.dynamic_batch else "static"


def _weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers: roughly what the ONNX file's initializers hold."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor))


def _default_opset(model_proto: Any) -> int | None:
    return next((entry.version for entry in model_proto.opset_import if entry.domain in ("", "ai.onnx")), None)


def _check_onnx(path: Path) -> None:
    """``onnx.checker`` on the written file; a failure is an exporter bug, reported as a failed verification."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise VerificationError(f"the exported ONNX model fails onnx.checker: {first_line(err)}") from err


def _reference(model: nn.Module, strip_clamp: bool) -> nn.Module:
    """The eval-mode PyTorch model the export must match (clamp stripped when it is stripped from the export)."""
    return strip_clamps(model) if strip_clamp else copy.deepcopy(model).eval()


def _as_tensor_list(inputs: ExampleInputs) -> list[Tensor]:
    """``inputs`` as a list of tensors: a bare tensor is the one input of a one-input model."""
    return [inputs] if isinstance(inputs, Tensor) else list(inputs)


def save_failing_batches(folder: Path | str, failing: Sequence[BatchResult]) -> list[str]:
    """Save each failing batch as ``FOLDER/failing-<batch>.npz``; returns the paths written.

    Each archive holds the inputs (``input_0``, ...), the reference's outputs
    (``reference_0``, ...), the candidate's where it ran (``candidate_0``, ...) and the output
    labels (``output_labels``). ``folder`` is created if missing; an existing file is never
    replaced: the first free ``failing-<batch>-K.npz`` is used instead.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [str(_save_batch(folder, result)) for result in failing]


def _save_batch(folder: Path, result: BatchResult) -> Path:
    arrays = {f"input_{i}": t.detach().cpu().numpy() for i, t in enumerate(result.inputs)}
    arrays |= {f"reference_{i}": value for i, (_, value) in enumerate(result.expected)}
    arrays |= {f"candidate_{i}": np.asarray(value) for i, value in enumerate(result.actual or [])}
    arrays["output_labels"] = np.array([label for label, _ in result.expected])
    stem = "failing-" + re.sub(r"[^a-z0-9]+", "-", result.label.lower()).strip("-")
    attempt = 1
    while True:
        path = folder / (f"{stem}.npz" if attempt == 1 else f"{stem}-{attempt}.npz")
        try:
            with path.open("xb") as file:  # exclusive: never over an existing file, even one made meanwhile
                np.savez(file, **arrays)
            return path
        except FileExistsError:
            attempt += 1


def _finish(staged: Path, destination: Path, report: ExportReport, keep_failed: bool, replace: bool) -> ExportReport:
    """Publish ``staged`` if it verified (or was not verified); else keep it aside or drop it and raise."""
    for text in report.warnings:  # for the library's users; the CLI shows the report's list instead
        warnings.warn(text, ExportWarning, stacklevel=4)
    if report.verification is None or report.verification.passed:
        published = publish_with_data(staged, destination, replace=replace)
        report.path = str(destination)
        report.data_path = str(published[0]) if len(published) > 1 else None
        return report
    message = report.verification.summary()
    if report.saved_failing:
        message += f"; the failing batches were saved as {', '.join(map(quoted, report.saved_failing))}"
    if keep_failed:
        kept = failed_path(destination)
        if data_file(staged).exists():  # the kept model must find its data under the kept name
            _refer_to_data(staged, data_file(kept).name)
            data_file(staged).rename(data_file(staged.with_name(kept.name)))
            staged = staged.rename(staged.with_name(kept.name))
        publish_with_data(staged, kept, replace=False)  # never an earlier failed file
        report.kept_failed = str(kept)
        message += f"; the failed file was kept as {quoted(kept)}"
    else:
        message += f"; nothing was written to {quoted(destination)}"
    raise ExportMismatchError(message, report)


def export_onnx(
    model: nn.Module,
    path: Path | str,
    example_inputs: ExampleInputs,
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
    save_failing: Path | str | None = None,
) -> ExportReport:
    """Fold ``model``, export it to ONNX at ``path`` and verify it with onnxruntime.

    Args:
        model: the PyTorch model; never modified.
        path: the destination; written (replaced) only once the export verified.
        example_inputs: one tensor per model input (a bare tensor for a one-input model); their shapes are
            the declared shapes.
        strip_clamp: remove OnlineNorm's activation clamp (from the export and the reference).
        opset: ONNX opset, :data:`~onorm_convert.options.MIN_OPSET` to
            :data:`~onorm_convert.options.MAX_OPSET`; None for the exporter's default.
        dynamic_batch: make dim 0 of every input dynamic.
        verify: compare with onnxruntime; when False the file is published unverified.
        atol, rtol: tolerances, finite and >= 0: one for all outputs or a dict per output label
            (``"*"`` the default).
        real_inputs: real inputs to verify on too (any batch size); with ``strip_clamp`` they feed the clamp audit.
        keep_failed: keep a file that failed verification as ``NAME.verification-failed.onnx``.
        replace: replace a file at ``path``; when False, a file there (even one that appeared while
            exporting) is left alone and the export fails with BadInputError.
        progress: called with a short line before each step.
        save_failing: a folder where a failed verification saves each failing batch as an ``.npz`` file
            (see :func:`save_failing_batches`); created if missing.

    Returns:
        The :class:`ExportReport`. Raises :class:`ExportMismatchError` (exit 1) on a mismatch,
        :class:`~onorm_convert.errors.OptionError` for an out-of-range option and
        :class:`~onorm_convert.errors.BadInputError` (exit 2, both) for unusable inputs.
    """
    options = ExportOptions(
        strip_clamp=strip_clamp, opset=opset, dynamic_batch=dynamic_batch, verify=verify,
        atol=atol, rtol=rtol, keep_failed=keep_failed, replace=replace,
    )  # fmt: skip
    return export_model(
        Format.ONNX, model, path, example_inputs, options,
        real_inputs=real_inputs, progress=progress, save_failing=save_failing,
    )  # fmt: skip


def export_torch(
    model: nn.Module,
    path: Path | str,
    example_inputs: ExampleInputs,
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
    save_failing: Path | str | None = None,
) -> ExportReport:
    """Fold ``model``, write it as a ``torch.export`` program (``.pt2``) at ``path`` and verify the reloaded program.

    The program loads with ``torch.export.load`` (no unpickling), for runtimes other than ONNX.

    Args:
        model: the PyTorch model; never modified.
        path: the destination; written (replaced) only once the export verified.
        example_inputs: one tensor per model input (a bare tensor for a one-input model); their shapes are
            the declared shapes.
        strip_clamp: remove OnlineNorm's activation clamp (from the export and the reference).
        dynamic_batch: make dim 0 of every input dynamic.
        verify: run the reloaded program against the PyTorch model; when False the file is published unverified.
        atol, rtol: tolerances, finite and >= 0: one for all outputs or a dict per output label
            (``"*"`` the default).
        real_inputs: real inputs to verify on too (any batch size); with ``strip_clamp`` they feed the clamp audit.
        keep_failed: keep a file that failed verification as ``NAME.verification-failed.pt2``.
        replace: replace a file at ``path``; when False, a file there (even one that appeared while
            exporting) is left alone and the export fails with BadInputError.
        progress: called with a short line before each step.
        save_failing: as for :func:`export_onnx`.

    Returns:
        The :class:`ExportReport`; raises as :func:`export_onnx` does.
    """
    options = ExportOptions(
        strip_clamp=strip_clamp, dynamic_batch=dynamic_batch, verify=verify,
        atol=atol, rtol=rtol, keep_failed=keep_failed, replace=replace,
    )  # fmt: skip
    return export_model(
        Format.TORCH, model, path, example_inputs, options,
        real_inputs=real_inputs, progress=progress, save_failing=save_failing,
    )  # fmt: skip


def export_model(
    fmt: Format,
    model: nn.Module,
    path: Path | str,
    example_inputs: ExampleInputs,
    options: ExportOptions,
    *,
    real_inputs: ExampleInputs | None = None,
    progress: Callable[[str], None] | None = None,
    save_failing: Path | str | None = None,
) -> ExportReport:
    """Fold ``model``, export it in format ``fmt`` at ``path`` and verify the written file.

    What :func:`export_onnx` and :func:`export_torch` do, with the format and the (already
    checked) options as values; their docstrings describe the arguments.
    """
    say = progress or (lambda text: None)
    exporter = EXPORTERS[fmt]
    destination = Path(path)
    example_inputs = _as_tensor_list(example_inputs)
    real_inputs = None if real_inputs is None else _as_tensor_list(real_inputs)
    shapes = [tuple(t.shape) for t in example_inputs]
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    say("folding normalization layers")
    reference = _reference(model, options.strip_clamp)
    check_returns_tensors(
        run_model(reference, example_inputs)
    )  # fails early, naming the layer, when the model rejects the inputs
    folded, fold_report = fold_with_report(model, strip_clamp=options.strip_clamp, example_inputs=example_inputs)
    check_model_values(model, "exporting")  # what verification cannot see: --no-verify would publish it
    seconds["fold"] = time.perf_counter() - start
    report = ExportReport(
        None, fmt, None, options.dynamic_batch, options.strip_clamp, fold_report, shapes, seconds=seconds
    )
    if not fold_report.traced:
        report.warnings.append(f"normalization layers were not folded into their producers: {fold_report.trace_error}")

    with staged_folder(destination) as folder:
        staged = folder / destination.name  # its final name, so that external data is referred to by its final name
        start = time.perf_counter()
        say(f"exporting to {exporter.describe(options)}")
        written = exporter.write(folded, example_inputs, staged, options)
        report.opset, report.op_counts = written.opset, written.op_counts
        seconds["export"] = time.perf_counter() - start

        if options.verify:
            start = time.perf_counter()
            run, runtime = exporter.runner(staged)
            batches = verification_batches(shapes, dynamic_batch=options.dynamic_batch, real_inputs=real_inputs)
            _verify(report, model, reference, run, runtime, batches, options, save_failing, say)
            seconds["verify"] = time.perf_counter() - start
            if report.clamped_agreement is not None and real_inputs is None:
                report.warnings.append(_stripped_only_warning(report.clamped_agreement))
        else:
            report.warnings.append(
                "verification skipped (--no-verify): the exported model was not compared with PyTorch"
            )

        if options.strip_clamp and real_inputs is not None:
            say("auditing the stripped clamps on the real inputs")
            report.clamp_audit = clamp_audit(model, real_inputs)
            if not report.clamp_audit.clean:
                report.warnings.append(_clamp_warning(report.clamp_audit))
        return _finish(staged, destination, report, options.keep_failed, options.replace)


def _verify(
    report: ExportReport,
    model: nn.Module,
    reference: nn.Module,
    run: Runner,
    runtime: str,
    batches: Sequence[tuple[str, list[Tensor]]],
    options: ExportOptions,
    save_failing: Path | str | None,
    say: Callable[[str], None],
) -> None:
    """Verify the written file (``run``) against ``reference`` into ``report``, with the figures beyond the checks.

    A stripped export is compared with the clamped ``model`` on the same batches too
    (``report.clamped_agreement``); failing batches are saved into ``save_failing`` when given.
    """
    reference_name = STRIPPED_REFERENCE if options.strip_clamp else "the PyTorch model"
    say(f"verifying against {reference_name}")
    clamped = AgreementMeter(_reference(model, False), CLAMPED_REFERENCE) if options.strip_clamp else None
    failing: list[BatchResult] = []  # kept only for save_failing: they hold every input and output

    def on_batch(result: BatchResult) -> None:
        if clamped is not None:
            clamped(result)
        if save_failing is not None and not result.passed:
            failing.append(result)

    report.verification = verify_outputs(
        reference, run, runtime, batches, atol=options.atol, rtol=options.rtol,
        reference_name=reference_name, on_batch=on_batch,
    )  # fmt: skip
    report.clamped_agreement = None if clamped is None else clamped.agreement
    if failing:
        report.saved_failing = save_failing_batches(save_failing, failing)


def _stripped_only_warning(agreement: ReferenceAgreement) -> str:
    """What a stripped export without real inputs was verified against, and how far it is from the trained model."""
    worst = max((batch.max_abs_diff for batch in agreement.batches), default=float("nan"))
    return (
        f"verified against {STRIPPED_REFERENCE} on random inputs only; against {agreement.reference} "
        f"the export differs by up to {worst:.3g} on the same batches "
        "(pass --inputs with real data to audit the clamp)"
    )


def _clamp_warning(audit: ClampAuditReport) -> str:
    cut = [a for a in audit.layers if a.clipped]
    layers = ", ".join(f"{a.layer} {a.fraction:.3%}" for a in cut[:5]) + (
        f" and {len(cut) - 5} more" if len(cut) > 5 else ""
    )
    return f"stripping the clamp changes outputs on the real inputs by up to {audit.max_output_change:.3g}" + (
        f"; activations the clamp would cut: {layers}" if cut else ""
    )
