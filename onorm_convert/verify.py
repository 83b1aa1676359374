"""Proving an exported model computes what the PyTorch model computes.

Both are run on the same batches (seeded random ones of the declared shapes, batch 1 and
a larger one, and real inputs when given); every output is compared element by element,
Polygraphy-style: it passes when ``|candidate - reference| <= atol + rtol * |reference|``
everywhere and both are finite. A NaN never "matches" a NaN.

The two tolerances add up, element by element: an element passes when its error is within
``atol + rtol * |reference|``, so a small error on an element whose reference is near 0 can
pass through ``atol`` with a large relative error (0.005 against ``rtol=0.001``), and a large
error on a large element can pass through ``rtol``. Each check therefore reports, besides the
maximum errors, their 50th and 99th percentiles, which tolerance carried the pass
(``passes_by``), the smallest ``atol`` that would have passed with the given ``rtol``
(``min_atol``) and the smallest ``rtol`` with the given ``atol`` (``min_rtol``), and, for
logits (an ``(N, K)`` output, ``K > 1``), the fraction of rows with the same top-1 class, and
with the same five top classes where ``K >= 5``.

The clamp audit measures what stripping OnlineNorm's activation clamp changes on real
inputs: per layer, the fraction of activations the clamp cuts and by how much.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import BadInputError, VerificationError, first_line
from .inputs import random_inputs, run_model
from .layers import OnlineNormBase
from .layers.functional import CLAMP
from .options import Tolerance
from .shared import check_returns_tensors, ecm_off, eval_mode, labelled_tensors, strip_clamps

Outputs = list[tuple[str, np.ndarray]]  # (label, value) per output, in flattening order


def flatten_outputs(output: Any, label: str = "output") -> Outputs:
    """:func:`labelled_tensors` as numpy arrays, the form every runtime's outputs are compared in."""
    return [(name, tensor.detach().cpu().numpy()) for name, tensor in labelled_tensors(output, label)]


def tolerance_for(label: str, tolerance: Tolerance) -> float:
    """The tolerance that applies to output ``label``."""
    if isinstance(tolerance, Mapping):
        if label not in tolerance and "*" not in tolerance:
            raise BadInputError(f"no tolerance for output {label!r}: give one for it or a default under '*'")
        return float(tolerance[label] if label in tolerance else tolerance["*"])
    return float(tolerance)


@dataclass
class OutputCheck:
    """One output on one batch: the errors and the verdict."""

    batch: str  # which input set, e.g. "random batch 1"
    output: str  # the output's label, e.g. "output[0]"
    shape: tuple[int, ...]
    max_abs: float  # max |candidate - reference|
    max_rel: float  # max |candidate - reference| / |reference| over elements where reference != 0
    atol: float
    rtol: float
    passed: bool
    problem: str = ""  # why it failed, when it did
    abs_p50: float = float("nan")  # median |candidate - reference|
    abs_p99: float = float("nan")
    rel_p50: float = float("nan")  # median relative error, over elements where reference != 0
    rel_p99: float = float("nan")
    min_atol: float = float("nan")  # the smallest atol that passes with this rtol
    min_rtol: float = float("nan")  # the smallest rtol that passes with this atol; inf: none does
    passes_by: str = ""  # "atol", "rtol", "atol or rtol" (each alone suffices), "atol + rtol" (only both); "" if failed
    top1: float | None = None  # logits only: fraction of rows with the same top-1 class
    top5: float | None = None  # logits with >= 5 classes: fraction of rows with the same five top classes


@dataclass
class ErrorFigures:
    """How one output's errors are distributed, and which tolerances would have passed it (see :class:`OutputCheck`)."""

    abs_p50: float = float("nan")
    abs_p99: float = float("nan")
    rel_p50: float = float("nan")
    rel_p99: float = float("nan")
    min_atol: float = float("nan")
    min_rtol: float = float("nan")
    passes_by: str = ""
    top1: float | None = None
    top5: float | None = None


@dataclass
class VerifyReport:
    """All checks of one verification."""

    runtime: str  # what ran the exported model, e.g. "onnxruntime 1.18 (CPU)"
    checks: list[OutputCheck] = field(default_factory=list)
    reference: str = "the PyTorch model"  # what the exported model was compared with

    @property
    def passed(self) -> bool:
        """True when there were checks and all passed."""
        return bool(self.checks) and all(check.passed for check in self.checks)

    def failures(self) -> list[OutputCheck]:
        """The checks that failed."""
        return [check for check in self.checks if not check.passed]

    def summary(self) -> str:
        """One line: the verdict and the worst errors."""
        worst_abs = max((c.max_abs for c in self.checks), default=float("nan"))
        worst_rel = max((c.max_rel for c in self.checks), default=float("nan"))
        verdict = "verified" if self.passed else f"MISMATCH in {len(self.failures())} of {len(self.checks)} checks"
        line = (
            f"{verdict} with {self.runtime} against {self.reference}: "
            f"max abs error {worst_abs:.3g}, max rel error {worst_rel:.3g}"
        )
        problems = sorted({check.problem for check in self.failures() if check.problem})
        return line + (f" ({'; '.join(problems)})" if problems else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "passed": self.passed,
            "runtime": self.runtime,
            "reference": self.reference,
            "checks": [asdict(check) for check in self.checks],
        }


def compare_arrays(
    reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float
) -> tuple[float, float, bool, str]:
    """Compare one output; returns ``(max_abs, max_rel, passed, problem)``.

    Passes when shapes are equal, both are finite everywhere and
    ``|candidate - reference| <= atol + rtol * |reference|`` element-wise.
    """
    if reference.shape != candidate.shape:
        return (
            float("inf"),
            float("inf"),
            False,
            f"shape {candidate.shape} differs from the PyTorch shape {reference.shape}",
        )
    for who, values in (("PyTorch", reference), ("exported", candidate)):
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            count = int((~np.isfinite(values)).sum())
            return float("nan"), float("nan"), False, f"the {who} output has {count} non-finite (NaN/Inf) values"
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(cand - ref)
    magnitude = np.abs(ref)
    max_abs = float(diff.max(initial=0.0))
    nonzero = magnitude > 0
    max_rel = float((diff[nonzero] / magnitude[nonzero]).max(initial=0.0))
    within = bool((diff <= atol + rtol * magnitude).all())
    return max_abs, max_rel, within, "" if within else f"outside atol={atol:g} + rtol={rtol:g} * |reference|"


def error_figures(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> ErrorFigures:
    """The percentiles, the tolerances that carry or would carry the pass, and the top-k agreement of one output.

    Only for outputs :func:`compare_arrays` could compare (same shape, finite everywhere).
    """
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff, magnitude = np.abs(cand - ref), np.abs(ref)
    nonzero = magnitude > 0
    rel = diff[nonzero] / magnitude[nonzero]
    abs_p50, abs_p99 = _percentiles(diff)
    rel_p50, rel_p99 = _percentiles(rel)
    min_atol = float(np.maximum(diff - rtol * magnitude, 0.0).max(initial=0.0))
    beyond_atol_at_zero = bool((diff[~nonzero] > atol).any())
    min_rtol = (
        float("inf")
        if beyond_atol_at_zero
        else float(np.maximum(rel - atol / magnitude[nonzero], 0.0).max(initial=0.0))
    )
    return ErrorFigures(
        abs_p50, abs_p99, rel_p50, rel_p99, min_atol, min_rtol,
        passes_by=_passes_by(diff, magnitude, atol, rtol),
        top1=topk_agreement(reference, candidate, 1),
        top5=topk_agreement(reference, candidate, 5),
    )  # fmt: skip


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """The 50th and 99th percentiles; 0 for no values (an empty output, or a reference that is 0 everywhere)."""
    if not values.size:
        return 0.0, 0.0
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def _passes_by(diff: np.ndarray, magnitude: np.ndarray, atol: float, rtol: float) -> str:
    """Which tolerance carries the pass: "atol", "rtol", "atol or rtol", "atol + rtol"; "" when the output fails."""
    by_atol = bool((diff <= atol).all())
    by_rtol = bool((diff <= rtol * magnitude).all())
    if by_atol or by_rtol:
        return " or ".join(name for name, alone in (("atol", by_atol), ("rtol", by_rtol)) if alone)
    return "atol + rtol" if bool((diff <= atol + rtol * magnitude).all()) else ""


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float | None:
    """For logits (an ``(N, K)`` output, ``K > 1``, ``N > 0``): the fraction of rows whose ``k`` top classes are the same set.

    None when the output is not logits or has fewer than ``k`` classes.
    """
    if reference.ndim != 2 or reference.shape[1] < max(k, 2) or reference.shape[0] == 0:
        return None

    def top(values: np.ndarray) -> np.ndarray:
        return np.sort(np.argsort(-values, axis=1, kind="stable")[:, :k], axis=1)

    return float((top(reference) == top(candidate)).all(axis=1).mean())


def compare_outputs(
    batch: str, reference: Outputs, candidate: Sequence[np.ndarray], atol: Tolerance, rtol: Tolerance
) -> list[OutputCheck]:
    """One :class:`OutputCheck` per output of ``reference`` (a count mismatch fails every check)."""
    if len(candidate) != len(reference):
        problem = f"the exported model has {len(candidate)} outputs, PyTorch {len(reference)}"
        return [
            OutputCheck(
                batch,
                label,
                tuple(ref.shape),
                float("inf"),
                float("inf"),
                tolerance_for(label, atol),
                tolerance_for(label, rtol),
                False,
                problem,
            )
            for label, ref in reference
        ]
    checks = []
    for (label, ref), cand in zip(reference, candidate):
        a, r = tolerance_for(label, atol), tolerance_for(label, rtol)
        cand = np.asarray(cand)
        max_abs, max_rel, passed, problem = compare_arrays(ref, cand, a, r)
        compared = np.isfinite(max_abs)  # inf or nan: shapes differ or a value is not finite; no figures
        figures = error_figures(ref, cand, a, r) if compared else ErrorFigures()
        checks.append(
            OutputCheck(batch, label, tuple(ref.shape), max_abs, max_rel, a, r, passed, problem, **asdict(figures))
        )
    return checks


def verification_batches(
    shapes: Sequence[Sequence[int]],
    *,
    dynamic_batch: bool = True,
    real_inputs: Sequence[Tensor] | None = None,
    seed: int = 0,
) -> list[tuple[str, list[Tensor]]]:
    """Labelled input sets: seeded random batches (1 and a larger one when the batch is dynamic), then real inputs."""
    declared = shapes[0][0] if shapes and shapes[0] else 1
    sizes = sorted({1, max(declared, 2)}) if dynamic_batch else [declared]
    batches = [(f"random batch {size}", random_inputs(shapes, batch=size, seed=seed + size)) for size in sizes]
    if real_inputs is not None:
        batches.append((f"real inputs (batch {real_inputs[0].shape[0]})", list(real_inputs)))
    return batches


def onnxruntime_runner(path: Path) -> tuple[Callable[[Sequence[Tensor]], list[np.ndarray]], str]:
    """A function running the ONNX file at ``path`` on onnxruntime's CPU provider, and its description.

    The session is created at the first run, so a file the runtime refuses to load fails
    verification (exit 1) just as a wrong output does.
    """
    import onnxruntime

    session = None

    def run(inputs: Sequence[Tensor]) -> list[np.ndarray]:
        nonlocal session
        if session is None:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [node.name for node in session.get_inputs()]
        return session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)})

    return run, f"onnxruntime {onnxruntime.__version__} (CPU)"


@dataclass
class BatchResult:
    """One verification batch as run: its inputs, both models' outputs and the checks of them."""

    label: str
    inputs: Sequence[Tensor]
    expected: Outputs  # the reference's outputs
    actual: list[np.ndarray] | None  # the candidate's; None when its runtime failed
    checks: list[OutputCheck]

    @property
    def passed(self) -> bool:
        """True when every check of this batch passed."""
        return all(check.passed for check in self.checks)


def verify_outputs(
    reference: nn.Module,
    run_candidate: Callable[[Sequence[Tensor]], list[np.ndarray]],
    runtime: str,
    batches: Sequence[tuple[str, Sequence[Tensor]]],
    *,
    atol: Tolerance = 1e-4,
    rtol: Tolerance = 1e-3,
    reference_name: str = "the PyTorch model",
    on_batch: Callable[[BatchResult], None] | None = None,
) -> VerifyReport:
    """Compare ``run_candidate`` with ``reference`` (an eval-mode module) on every batch.

    ``reference_name`` says in the report what ``reference`` is; ``on_batch`` is called with
    each :class:`BatchResult`, for figures beyond the checks (another reference, saving failures).
    """
    report = VerifyReport(runtime, reference=reference_name)
    for label, inputs in batches:
        expected = flatten_outputs(run_model(reference, inputs))
        try:
            actual = run_candidate(inputs)
        except Exception as err:  # noqa: BLE001 - the runtime rejecting the file is a failed verification
            checks = [_runtime_failure(label, f"{runtime} failed: {first_line(err)}")]
            actual = None
        else:
            checks = compare_outputs(label, expected, actual, atol, rtol)
        report.checks.extend(checks)
        if on_batch is not None:
            on_batch(BatchResult(label, inputs, expected, actual, checks))
    return report


def _runtime_failure(batch: str, problem: str) -> OutputCheck:
    """The one failed check of a batch the candidate's runtime could not run."""
    inf, nan = float("inf"), float("nan")
    return OutputCheck(batch, "<all>", (), inf, inf, nan, nan, False, problem)


@dataclass
class BatchAgreement:
    """The candidate against a second reference on one batch."""

    batch: str
    samples: int  # rows of the batch
    max_abs_diff: float  # the largest |candidate - reference| over every output
    top1_agreement: float | None  # fraction of rows with the same top-1 class in every logits output; None: no logits


@dataclass
class ReferenceAgreement:
    """The exported model against a second reference on the verification batches: informational, never a failure."""

    reference: str  # what it was compared with, e.g. "the PyTorch model with its clamp (as trained)"
    batches: list[BatchAgreement] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class AgreementMeter:
    """Collects, batch by batch (an ``on_batch`` of :func:`verify_outputs`), how the candidate agrees with ``reference``."""

    def __init__(self, reference: nn.Module, reference_name: str) -> None:
        self.reference = reference  # eval mode
        self.agreement = ReferenceAgreement(reference_name)

    def __call__(self, result: BatchResult) -> None:
        """Add one batch; a batch the candidate failed on, or whose outputs differ in structure, is left out."""
        if result.actual is None or len(result.actual) != len(result.expected):
            return
        expected = [value for _, value in flatten_outputs(run_model(self.reference, result.inputs))]
        pairs = [(ref, np.asarray(cand)) for ref, cand in zip(expected, result.actual)]
        if any(ref.shape != cand.shape for ref, cand in pairs):
            return
        rows = int(result.inputs[0].shape[0]) if result.inputs else 0
        same, diff = same_predictions(pairs, rows)
        top1 = float(same.mean()) if same is not None and rows else None
        self.agreement.batches.append(BatchAgreement(result.label, rows, diff, top1))


def same_predictions(pairs: Sequence[tuple[np.ndarray, np.ndarray]], rows: int) -> tuple[np.ndarray | None, float]:
    """Per row, whether the candidate's top-1 class equals the reference's in every logits output.

    Logits are ``(rows, K)`` outputs with ``K > 1``; None where there are none. Also returns
    the largest ``|candidate - reference|`` over every ``(reference, candidate)`` pair.
    """
    same, logits = np.ones(rows, dtype=bool), False
    for ref, cand in pairs:
        if ref.ndim == 2 and ref.shape[0] == rows and ref.shape[1] > 1:
            logits = True
            same &= ref.argmax(axis=1) == cand.argmax(axis=1)
    diff = max((float(np.abs(ref.astype(np.float64) - cand).max(initial=0.0)) for ref, cand in pairs), default=0.0)
    return (same if logits else None), diff


@dataclass
class ClampAudit:
    """What one OnlineNorm's clamp does on real inputs."""

    layer: str
    clamp_bound: float  # the layer's bound on |z| (OnlineNormBase.clamp_bound)
    activations: int  # values seen
    clipped: int  # values beyond ±clamp_bound, which the clamp cuts
    fraction: float  # clipped / activations
    max_change: float  # largest |z| - clamp_bound: the largest change of this layer's output by stripping


@dataclass
class ClampAuditReport:
    """Per layer audits, and the largest change of the model's outputs when every clamp is stripped."""

    layers: list[ClampAudit]
    max_output_change: float

    @property
    def clean(self) -> bool:
        """True when stripping changes nothing on these inputs."""
        return self.max_output_change == 0.0 and all(audit.clipped == 0 for audit in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "clean": self.clean,
            "max_output_change": self.max_output_change,
            "layers": [asdict(a) for a in self.layers],
        }


def clamp_audit(model: nn.Module, inputs: Sequence[Tensor]) -> ClampAuditReport:
    """Measure, on ``inputs``, what stripping every OnlineNorm clamp of ``model`` (eval mode) changes."""
    clamped = copy.deepcopy(model).eval()
    audits: dict[str, ClampAudit] = {}

    def audit_layer(name: str, layer: OnlineNormBase) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            excess = module.frozen_forward(args[0], None).abs() - layer.clamp_bound
            audit = audits.setdefault(name, ClampAudit(name, layer.clamp_bound, 0, 0, 0.0, 0.0))
            audit.activations += excess.numel()
            audit.clipped += int((excess > 0).sum())
            audit.fraction = audit.clipped / max(audit.activations, 1)
            audit.max_change = max(audit.max_change, float(excess.max().clamp(min=0)))

        return hook

    layers = [(n, m) for n, m in clamped.named_modules() if isinstance(m, OnlineNormBase) and m.ecm == CLAMP]
    handles = [layer.register_forward_hook(audit_layer(name, layer)) for name, layer in layers]
    try:
        with_clamp = flatten_outputs(run_model(clamped, inputs))
    finally:
        for handle in handles:
            handle.remove()
    without_clamp = flatten_outputs(run_model(strip_clamps(clamped), inputs))
    change = max(
        (float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) for (_, a), (_, b) in zip(with_clamp, without_clamp)),
        default=0.0,
    )
    return ClampAuditReport([audits.get(n, ClampAudit(n, m.clamp_bound, 0, 0, 0.0, 0.0)) for n, m in layers], change)


# --- the conversion check: the converted model against its original -------------------------------

EXACT_RTOL = 1e-5  # the swap with the ECM off must match the original to this relative error


@dataclass
class ConversionCheck:
    """The outputs of the original and converted models compared in eval mode."""

    max_abs_diff: float  # converted as configured (clamp on) vs original
    exact_rel_diff: float  # converted with the ECM off vs original, relative to the largest output
    exact: bool  # exact_rel_diff <= EXACT_RTOL

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields, with the tolerance used."""
        return {**self.__dict__, "tolerance": EXACT_RTOL}


def check_conversion(original: nn.Module, converted: nn.Module, inputs: Sequence[Tensor]) -> ConversionCheck:
    """Run both models in eval mode on ``inputs``: the largest output difference as converted, and with the ECM off.

    With the ECM off, every OnlineNorm in either model computes without its clamp or layer
    scaling, so the comparison isolates the swap itself.

    Training flags are restored afterwards. Raises VerificationError if an output is not
    finite or the two models' outputs differ in structure or shape.
    """
    with eval_mode(original), eval_mode(converted):
        reference = _finite_outputs(run_model(original, inputs), "original")
        as_converted = _finite_outputs(run_model(converted, inputs), "converted")
        with ecm_off(original, converted):  # the original may hold OnlineNorms already
            reference_off = _finite_outputs(run_model(original, inputs), "original (ECM off)")
            exact = _finite_outputs(run_model(converted, inputs), "converted (ECM off)")
    max_abs = max((_max_abs(a.double() - b.double()) for a, b in _paired(reference, as_converted)), default=0.0)
    rel = max(
        (_max_abs(a.double() - b.double()) / max(_max_abs(a), 1e-12) for a, b in _paired(reference_off, exact)),
        default=0.0,
    )
    return ConversionCheck(max_abs, rel, rel <= EXACT_RTOL)


def _finite_outputs(output: Any, which: str) -> list[Tensor]:
    check_returns_tensors(output, f"the {which} model")
    tensors = [tensor for _, tensor in labelled_tensors(output)]
    for index, tensor in enumerate(tensors):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise VerificationError(
                f"output {index} of the {which} model contains NaN or Inf on the example input; nothing to verify"
            )
    return tensors


def _paired(reference: list[Tensor], other: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    if len(reference) != len(other) or any(a.shape != b.shape for a, b in zip(reference, other)):
        shapes = [tuple(t.shape) for t in reference], [tuple(t.shape) for t in other]
        raise VerificationError(
            f"the converted model's outputs {shapes[1]} differ in structure from the original's {shapes[0]}"
        )
    return list(zip(reference, other))


def _max_abs(t: Tensor) -> float:
    """``max|t|``; 0 for an empty output (a detector that found nothing)."""
    return t.abs().max().item() if t.numel() else 0.0


# --- predictions on real inputs: does the converted model still decide as the original did? -------


@dataclass
class AgreementReport:
    """The converted model against its original on real inputs, in eval mode."""

    samples: int  # inputs compared
    logits: bool  # an output is (N, classes) with classes > 1: predictions are compared
    agreement: (
        float | None
    )  # fraction of samples with the same top-1 prediction in every logits output (None: no logits)
    changed: int  # samples whose top-1 prediction changed
    max_abs_change: float  # the largest |converted - original| over every output

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def prediction_agreement(original: nn.Module, converted: nn.Module, inputs: Sequence[Tensor]) -> AgreementReport:
    """Top-1 agreement and the largest output change of ``converted`` against ``original`` on ``inputs``."""
    with eval_mode(original), eval_mode(converted):
        reference = _finite_outputs(run_model(original, inputs), "original")
        candidate = _finite_outputs(run_model(converted, inputs), "converted")
    pairs = [
        (a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy()) for a, b in _paired(reference, candidate)
    ]
    samples = int(inputs[0].shape[0]) if inputs else 0
    same, change = same_predictions(pairs, samples)
    if same is None:
        return AgreementReport(samples, False, None, 0, change)
    return AgreementReport(samples, True, float(same.mean()) if samples else None, int((~same).sum()), change)
