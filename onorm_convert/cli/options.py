"""Options shared by every command, and loading the MODEL argument the same way everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadInputError
from ..inputs import parse_input_shape
from ..load import LoadedModel, LoadWarning, read_model
from .app import Console, warnings_shown_on

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file: a state dict (+ --arch), an onorm checkpoint, or a pickled module (+ --trust).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="package.module:factory that builds the model, for a state dict (the current directory is importable).",
        show_default=False,
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        help="JSON object of keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.",
        show_default=False,
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", help="The key holding the state dict inside a training checkpoint.", show_default=False),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Run code that the file chooses: unpickle a whole module, or import the model code named by an onorm checkpoint that your onorm did not write.",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout instead of text.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for failures.")]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Example input shape, e.g. 1,3,224,224; repeat for a model with several inputs.",
        show_default=False,
    ),
]
OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Output file.", show_default=False)]
InputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        help="Real inputs to check on (.npy, .npz, or a torch.save'd tensor/list/dict; never unpickled).",
        show_default=False,
    ),
]


def parse_arch_kwargs(text: str | None) -> dict:
    """The ``--arch-kwargs`` JSON object as a dict ({} when not given)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError(
            f"--arch-kwargs {text!r}: not valid JSON ({err.msg} at column {err.colno}); e.g. '{{\"num_classes\": 10}}'"
        ) from err
    except RecursionError as err:
        raise BadInputError(
            f"--arch-kwargs: nested too deeply ({len(text)} characters); pass a flat JSON object of keyword arguments"
        ) from err
    if not isinstance(value, dict):
        raise BadInputError(f"--arch-kwargs {text!r}: expected a JSON object, e.g. '{{\"num_classes\": 10}}'")
    return value


def parse_input_shapes(texts: list[str] | None) -> list[tuple[int, ...]]:
    """Every repeated ``--input-shape`` parsed, in order ([] when none given)."""
    return [parse_input_shape(text) for text in texts or []]


def load_for_cli(
    console: Console, model: Path, arch: str | None, arch_kwargs: str | None, key: str | None, trust: bool
) -> LoadedModel:
    """Read MODEL with the loading flags as typed on the command line; its LoadWarnings become console warnings."""
    kwargs = parse_arch_kwargs(arch_kwargs)
    with warnings_shown_on(console, LoadWarning):
        return read_model(
            model, arch=arch, arch_kwargs=kwargs if arch_kwargs is not None else None, key=key, trust=trust
        )
