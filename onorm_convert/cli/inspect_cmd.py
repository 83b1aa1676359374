"""``onorm inspect``: the normalization layers of a model, what convert would change and what export could fold."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from ..convert import ConversionWarning, convert_with_report, plan_conversion, why_nothing_converts
from ..errors import EXIT_OK
from ..fold import fold_with_report
from ..inputs import random_inputs
from .app import Console, app, format_table, run_command
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    DebugOpt,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    ModelArg,
    TrustOpt,
    load_for_cli,
    parse_input_shapes,
)

TABLE_COLUMNS = ("module", "type", "channels", "convert", "export")


@app.command()
def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the normalization layers, what convert would change and what export could fold. Writes nothing.

    The "export" column is what exporting the converted model does with each layer.
    """

    def body(console: Console) -> tuple[int, dict[str, Any]]:
        shapes = parse_input_shapes(input_shape)
        loaded = load_for_cli(console, model, arch, arch_kwargs, key, trust)
        shapes = shapes or loaded.input_shapes
        changes = plan_conversion(loaded.module, example_shapes=shapes or None)
        converted = _as_converted(loaded.module, shapes)
        _, fold_report = fold_with_report(converted, example_inputs=random_inputs(shapes) if shapes else None)
        folds = {step.norm: step for step in fold_report.steps}
        layers = []
        for change in changes:
            step = folds.get(change.name)
            export = (
                "-" if step is None else (f"fold into '{step.into}'" if step.into else f"{step.action}: {step.reason}")
            )
            step_fields = None if step is None else {k: v for k, v in asdict(step).items() if k != "norm"}
            layers.append(
                {**change.to_dict(), "export": export, "export_step": step_fields}
            )  # the text, and its fields
        report = {
            "input": str(model), "input_format": loaded.format, "arch": loaded.arch, "arch_kwargs": loaded.arch_kwargs,
            "input_shapes": [list(s) for s in shapes], "info": loaded.info, "layers": layers,
            "parameters": sum(p.numel() for p in loaded.module.parameters()),
        }  # fmt: skip
        console.print(
            f"{model}: {loaded.format}"
            + (f" built by {loaded.arch}" if loaded.arch else "")
            + f", {report['parameters']} parameters"
        )
        rows = [
            (
                layer["name"],
                layer["old_type"],
                str(layer["channels"]),
                f"-> {layer['new_type']}" if layer["new_type"] else f"keep ({layer['note']})",
                layer["export"],
            )
            for layer in layers
        ]
        for line in format_table(TABLE_COLUMNS, rows):
            console.print(line)
        if not layers:
            console.print(why_nothing_converts(loaded.module, changes))
        return EXIT_OK, report

    run_command("inspect", json_mode, debug, body)


def _as_converted(module: nn.Module, shapes: Sequence[Sequence[int]]) -> nn.Module:
    """A copy of ``module`` as ``onorm convert`` would write it: the model whose export the "export" column describes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)  # the "convert" column already says what is left alone
        return convert_with_report(module, example_shapes=shapes or None)[0]
