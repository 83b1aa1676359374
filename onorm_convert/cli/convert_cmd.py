"""``onorm convert``: a BatchNorm model in, an OnlineNorm model out, checked on example inputs."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ..checkpoint import make_checkpoint
from ..convert import ConversionWarning, LayerChange, convert_with_report, unmatched_globs
from ..errors import EXIT_MISMATCH, EXIT_OK, BadInputError, OptionError, quoted
from ..files import check_output_path, write_atomically
from ..inputs import fit_inputs, load_input_file, random_inputs
from ..load import ONORM_CHECKPOINT, PICKLED_MODULE, LoadedModel
from ..options import ConvertOptions
from ..verify import EXACT_RTOL, check_conversion, clamp_audit, prediction_agreement
from .app import Console, app, format_table, report_error, run_command, warnings_shown_on
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

TABLE_COLUMNS = ("module", "old type", "new type", "channels", "statistics source")


@app.command()
def convert(
    model: ModelArg,
    output: OutputOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    ecm: Annotated[str, typer.Option("--ecm", help="Error compensation: clamp, layer-scaling or none.")] = "clamp",
    clamp_value: Annotated[
        float,
        typer.Option(
            "--clamp-value",
            help="Clamp bound c for --ecm clamp: each layer bounds z by max(|beta| + c*|gamma|), what |y| <= c implies.",
        ),
    ] = ConvertOptions.clamp_value,
    alpha_fwd: Annotated[
        float,
        typer.Option(
            "--alpha-fwd",
            help="Forward (statistics) decay, where an adaptive one starts; the doc's 0.999 suits training from scratch.",
        ),
    ] = ConvertOptions.alpha_fwd,
    alpha_bkw: Annotated[
        float, typer.Option("--alpha-bkw", help="Backward (control) decay; the doc's 0.99 suits training from scratch.")
    ] = ConvertOptions.alpha_bkw,
    control: Annotated[
        str,
        typer.Option("--control", help="Backward control: stable (v's decay bounded) or exact (the doc's equations)."),
    ] = ConvertOptions.control,
    clamp_mode: Annotated[
        str, typer.Option("--clamp-mode", help="affine: bound z by max(|beta| + c*|gamma|); fixed: by c (the doc's).")
    ] = ConvertOptions.clamp_mode,
    alpha_mode: Annotated[
        str,
        typer.Option(
            "--alpha-mode",
            help="adaptive: each layer's forward decay starts at --alpha-fwd and follows the drift it sees; fixed: the doc's.",
        ),
    ] = ConvertOptions.alpha_mode,
    projection: Annotated[
        str,
        typer.Option(
            "--projection",
            help="batch: a batch of 2+ samples gets BatchNorm's projection of the input gradient; none: the doc's controls.",
        ),
    ] = ConvertOptions.projection,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include", help="Convert only modules whose name matches this glob (repeatable).", show_default=False
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Leave modules whose name matches this glob (repeatable).", show_default=False),
    ] = None,
    frozen_bn: Annotated[
        bool, typer.Option("--frozen-bn", help="Also convert torchvision FrozenBatchNorm2d (made trainable).")
    ] = False,
    require_converted: Annotated[
        bool,
        typer.Option(
            "--require-converted", help="Fail (exit 2) when no layer is converted or an --include glob matches nothing."
        ),
    ] = False,
    input_shape: InputShapeOpt = None,
    inputs: InputsOpt = None,
    min_agreement: Annotated[
        float,
        typer.Option(
            "--min-agreement",
            help="With --inputs: the least fraction of top-1 predictions that must stay the same (exit 1 below).",
        ),
    ] = 1.0,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Replace a model's BatchNorm layers by Online Normalization, keeping what it learned."""

    def body(console: Console) -> tuple[int, dict[str, Any]]:
        layer_options = ConvertOptions(
            ecm, clamp_value, alpha_fwd, alpha_bkw, control, clamp_mode, alpha_mode, projection
        )
        selection = {"include": list(include or []), "exclude": list(exclude or []), "frozen_bn": frozen_bn}
        options = {**asdict(layer_options), **selection}  # what the report and the checkpoint record
        if not 0.0 <= min_agreement <= 1.0:
            raise OptionError("min_agreement", min_agreement, "must be a fraction in [0, 1], e.g. 0.99")
        shapes = parse_input_shapes(input_shape)
        loaded = load_for_cli(console, model, arch, arch_kwargs, key, trust)
        sources = [model] if inputs is None else [model, inputs]
        destination = check_output_path(output or model.with_name(f"{model.stem}_onorm.pt"), sources, force)
        real = None if inputs is None else load_input_file(inputs)
        shapes = shapes or loaded.input_shapes or ([tuple(t.shape) for t in real] if real else [])
        if real is not None:
            real = fit_inputs(real, shapes, f"--inputs {quoted(inputs)}")
        converted, changes = _convert(loaded, layer_options, selection, shapes, console)
        if require_converted:
            _require_converted(loaded.module, changes, selection["include"])
        report: dict[str, Any] = {
            "input": str(model), "input_format": loaded.format, "key": loaded.info.get("key"),
            "dropped_keys": loaded.info.get("dropped_keys", []), "output": str(destination), "options": options,
            "layers": [change.to_dict() for change in changes],
            "converted": sum(change.new_type is not None for change in changes),
        }  # fmt: skip
        _print_table(console, changes)
        if shapes:
            check = check_conversion(loaded.module, converted, random_inputs(shapes))
            report["check"] = {"input_shapes": [list(s) for s in shapes], **check.to_dict()}
            console.print(
                f"check on {', '.join(map(str, shapes))}: max |difference| {check.max_abs_diff:.3g} with --ecm {ecm}; "
                f"ECM off: relative {check.exact_rel_diff:.3g} ({'exact' if check.exact else 'NOT exact'})"
            )
            if not check.exact:
                message = (
                    f"the converted model differs from the original beyond {EXACT_RTOL:g} (relative {check.exact_rel_diff:.3g} with the ECM off); "
                    "nothing written; if the model's code depends on the BatchNorm type, leave those layers out with --exclude"
                )
                report["error"] = report_error("convert", message, "VerificationError")
                return EXIT_MISMATCH, report
        else:
            report["check"] = None
            console.warn("no --input-shape: the conversion was not checked on an example input")
        if real is None:
            report["agreement"] = None
            if shapes:
                console.warn(
                    "only random inputs were checked; pass --inputs FILE to check the predictions on real data"
                )
        else:
            failed = _check_on_real_inputs(console, loaded.module, converted, real, min_agreement, report)
            if failed:
                return EXIT_MISMATCH, report
        report["output_format"] = _write(loaded, converted, destination, options, shapes, replace=force)
        console.print(f"converted {report['converted']} of {len(changes)} normalization layers -> {destination}")
        return EXIT_OK, report

    run_command("convert", json_mode, debug, body)


def _check_on_real_inputs(
    console: Console, original, converted, real: list, min_agreement: float, report: dict[str, Any]
) -> bool:
    """Predictions and clamp activity on ``real``, into ``report``; True (with the error reported) below ``min_agreement``."""
    agreement = prediction_agreement(original, converted, real)
    audit = clamp_audit(converted, real)
    report["agreement"] = {**agreement.to_dict(), "min_agreement": min_agreement, "clamp": audit.to_dict()["layers"]}
    cut = ", ".join(f"{a.layer} {a.fraction:.3%}" for a in audit.layers if a.clipped) or "none"
    if agreement.logits:
        console.print(
            f"on {agreement.samples} real inputs: {agreement.samples - agreement.changed} of {agreement.samples} top-1 predictions unchanged "
            f"({agreement.agreement:.2%}); largest output change {agreement.max_abs_change:.3g}; clamp cuts: {cut}"
        )
    else:
        console.print(
            f"on {agreement.samples} real inputs: largest output change {agreement.max_abs_change:.3g} (no logits to compare); clamp cuts: {cut}"
        )
    if agreement.logits and agreement.agreement < min_agreement:
        message = (
            f"{agreement.changed} of {agreement.samples} predictions on the real inputs changed ({agreement.agreement:.2%} agree, "
            f"--min-agreement {min_agreement:g}); nothing written; a larger --clamp-value (or --ecm none) keeps more of the original's outputs"
        )
        report["error"] = report_error("convert", message, "VerificationError")
        return True
    return False


def _require_converted(model: torch.nn.Module, changes: list[LayerChange], include: list[str]) -> None:
    unmatched = unmatched_globs(model, include)
    if unmatched:
        raise BadInputError(
            f"--include {unmatched[0]!r} matches no module of the model; nothing written (--require-converted)"
        )
    if not any(change.new_type for change in changes):
        raise BadInputError("no normalization layer was converted; nothing written (--require-converted)")


def _convert(
    loaded: LoadedModel,
    options: ConvertOptions,
    selection: dict[str, Any],
    shapes: list[tuple[int, ...]],
    console: Console,
):
    """convert_with_report with its ConversionWarnings shown as console warnings."""
    with warnings_shown_on(console, ConversionWarning):
        converted, changes = convert_with_report(loaded.module, options, example_shapes=shapes or None, **selection)
    if "conversion" in loaded.info and any(change.new_type for change in changes):
        raise BadInputError(
            f"the model was already converted with {loaded.info['conversion']}; converting it again with other options "
            "cannot be recorded: convert the original state dict with the options you want"
        )
    return converted, changes


def _write(
    loaded: LoadedModel, converted: torch.nn.Module, destination: Path, options: dict, shapes: list, replace: bool
) -> str:
    """Save a pickled module for a pickled module, else the self-describing checkpoint; returns the format written.

    Without ``replace`` (--force) the file is published exclusively: one that another run wrote meanwhile is kept.
    """
    if loaded.format == PICKLED_MODULE:
        content, written = converted, PICKLED_MODULE
    else:
        conversion = loaded.info.get("conversion", options)  # a converted model keeps the options it was converted with
        content = make_checkpoint(
            converted, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs, conversion=conversion, input_shapes=shapes
        )
        written = ONORM_CHECKPOINT
    write_atomically(destination, lambda tmp: torch.save(content, tmp), replace=replace)
    return written


def _print_table(console: Console, changes: list[LayerChange]) -> None:
    rows = [
        (
            c.name + (f" (= {', '.join(c.aliases)})" if c.aliases else ""),
            c.old_type,
            c.new_type or f"- ({c.note})",
            str(c.channels),
            c.stats,
        )
        for c in changes
    ]
    for line in format_table(TABLE_COLUMNS, rows):
        console.print(line)
