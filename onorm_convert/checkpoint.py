"""The converted model's file: written by ``onorm convert`` and :func:`save_checkpoint`, read back by ``load``.

A plain dict of tensors and JSON-like values, so ``torch.load(weights_only=True)`` reads it
and nothing in it runs code::

    {"format": FORMAT_TAG, "format_version": 3, "tool_version": "0.1.0",
     "arch": "package.module:factory", "arch_kwargs": {...},  # the code that builds the BatchNorm original
     "arch_location": "/path/to/package/__init__.py",        # where arch's top-level module was imported from
     "signature": "hex",                                      # this user's HMAC of the three fields above, or None
     "layers": {"layer1.0.bn1": {"rank": 2, "config": {...}}, ...},  # each OnlineNorm: class and constructor
     #   an OnlineNormAct2d also: "drop": {"class": "Identity", "args": {}}, "act": {"class": "SiLU", "args": {...}}
     "conversion": {"ecm": ..., "alpha_fwd": ..., ...},       # the options given to convert(), for the record
     "input_shapes": [[1, 3, 8, 8], ...],                     # example inputs; [] if none
     "state_dict": {...}}

Rebuilding it: ``arch(**arch_kwargs)``, each recorded layer swapped for the OnlineNorm its
entry describes (:func:`restore_layout`), then ``state_dict`` loaded, so the model comes
back exactly as it was saved. An OnlineNormAct2d's drop and act are modules chosen by code,
so they are recorded only as one of a few torch.nn classes with their constructor arguments
(``_REBUILDABLE_MODULES``); saving any other is refused. Version 1 files, which recorded
no ``layers``, and plain state dicts of converted models get their layout from the state
dict (:func:`inferred_layout`).
Only a checkpoint signed by this user's onorm is rebuilt from its own ``arch`` without
consent (:mod:`onorm_convert.trust`).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .errors import BadInputError, OptionError, quoted
from .files import write_atomically
from .layers import ONLINE_NORMS, OnlineNormAct2d, OnlineNormBase
from .layers.adaptive_alpha import ADAPTIVE, FIXED
from .options import ConvertOptions
from .shared import swap_modules
from .trust import MAX_DEPTH, KeyUnavailable, code_location, sign

FORMAT_TAG = "onorm_convert.checkpoint"
FORMAT_VERSION = 3  # 3: a layer may be an OnlineNormAct2d; 2: the layout is recorded ("layers"); 1: only the options
# package.module:factory, within reason: a recorded arch is shown in messages before anything is imported.
_ARCH_SPEC = re.compile(r"[A-Za-z_][\w.]{0,199}:[A-Za-z_][\w.]{0,199}", re.ASCII)  # ASCII: no look-alike letters
_SIGNATURE = re.compile(r"[0-9a-f]{64}", re.ASCII)
# The keyword arguments of onorm_convert.convert that a checkpoint records.
CONVERSION_OPTIONS = frozenset({option.name for option in fields(ConvertOptions)} | {"include", "exclude", "frozen_bn"})
# What an OnlineNorm is built from: its constructor's arguments, each kept as an attribute of the same name.
LAYER_CONFIG = tuple(
    name for name in inspect.signature(OnlineNormBase.__init__).parameters if name not in ("self", "device", "dtype")
)
_RANKS = {cls: rank for rank, cls in ONLINE_NORMS.items()} | {OnlineNormAct2d: 2}
_BATCH_NORM_RANKS = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))
_FROZEN_NORMS = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")  # torchvision's and timm's, by name: no _NormBase
_NORM_ACT_PARTS = ("drop", "act")  # an OnlineNormAct2d's modules after the norm, in order
# What a checkpoint can record as a drop or an act: these torch.nn classes (exactly), each with the constructor
# arguments it keeps as attributes of the same name. Anything else would need running code to rebuild.
_REBUILDABLE_MODULES: dict[str, tuple[str, ...]] = {
    "Identity": (), "Dropout": ("p", "inplace"), "Dropout2d": ("p", "inplace"),
    "ReLU": ("inplace",), "ReLU6": ("inplace",), "LeakyReLU": ("negative_slope", "inplace"), "PReLU": ("num_parameters",),
    "ELU": ("alpha", "inplace"), "CELU": ("alpha", "inplace"), "SELU": ("inplace",), "GELU": ("approximate",),
    "SiLU": ("inplace",), "Mish": ("inplace",), "Hardswish": ("inplace",), "Hardsigmoid": ("inplace",),
    "Sigmoid": (), "Tanh": (),
}  # fmt: skip

Layout = dict[str, dict[str, Any]]  # qualified name -> {"rank": 1|2|3, "config": {constructor argument: value}, ...}


class UnsignedCheckpointWarning(UserWarning):
    """A checkpoint was written without this user's signature: loading it will need --arch or --trust."""


def save_checkpoint(
    model: nn.Module,
    path: Path | str,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    input_shapes: Sequence[Sequence[int]] = (),
    replace: bool = True,
) -> None:
    """Save a converted ``model`` (trained or not) as a checkpoint that ``onorm export`` and ``load_model`` take.

    ``arch`` is ``"package.module:factory"``, the code that builds the BatchNorm original,
    called with ``arch_kwargs``. Every OnlineNorm layer is recorded with its settings, so the
    model is rebuilt exactly as it is, with its current weights and streaming state.
    ``input_shapes`` are example input shapes that ``onorm export`` then needs no
    ``--input-shape`` for. The file is written atomically and signed by this user
    (:mod:`onorm_convert.trust`); an existing ``path`` is replaced unless ``replace=False``,
    which publishes exclusively (a file that appears meanwhile is kept).
    """
    checkpoint = make_checkpoint(
        model, arch=arch, arch_kwargs=arch_kwargs or {}, conversion=conversion_of(model), input_shapes=input_shapes
    )
    write_checkpoint(Path(path), checkpoint, replace=replace)


def make_checkpoint(
    module: nn.Module,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    conversion: Mapping[str, Any],
    input_shapes: Sequence[Sequence[int]] = (),
) -> dict[str, Any]:
    """The checkpoint dict for a converted ``module`` built by ``arch(**arch_kwargs)``, signed by this user.

    Issues :class:`UnsignedCheckpointWarning` and leaves it unsigned where this user's key
    cannot be made (no writable home folder, an unsafe key file).
    """
    from . import __version__

    if not _ARCH_SPEC.fullmatch(arch):
        raise BadInputError(
            f"arch {arch!r}: expected package.module:factory, the code that builds the BatchNorm original"
        )
    layers = layout_of(module)
    location = code_location(arch)
    try:
        signature = sign(arch, arch_kwargs, location)
    except KeyUnavailable as err:
        warnings.warn(
            f"the checkpoint is not signed ({err}); loading it will need --arch {arch} or --trust",
            UnsignedCheckpointWarning,
            stacklevel=2,
        )
        signature = None
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "arch_location": location,
        "signature": signature,
        "layers": layers,
        "conversion": dict(conversion),
        "input_shapes": [list(shape) for shape in input_shapes],
        "state_dict": {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()},
    }


def write_checkpoint(path: Path, checkpoint: Mapping[str, Any], *, replace: bool = True) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temp file beside it, fsync, rename; see ``files.publish``)."""
    write_atomically(Path(path), lambda tmp: torch.save(dict(checkpoint), tmp), replace=replace)


def conversion_of(model: nn.Module) -> dict[str, Any]:
    """The options ``model``'s OnlineNorm layers share, as ``convert`` takes them ({} if they differ)."""
    settings = {ConvertOptions.of(module) for module in model.modules() if isinstance(module, OnlineNormBase)}
    return asdict(settings.pop()) if len(settings) == 1 else {}


def layout_of(model: nn.Module) -> Layout:
    """Each OnlineNorm layer of ``model`` (a shared one once, by its first name): its rank and constructor arguments.

    An OnlineNormAct2d's entry also records its drop and act (:func:`_module_record`).
    """
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, OnlineNormBase):
            if type(module) not in _RANKS:
                raise BadInputError(
                    f"'{name}' is a {type(module).__name__}; a checkpoint rebuilds onorm's own OnlineNorm1d/2d/3d and OnlineNormAct2d only"
                )
            layout[name] = {"rank": _RANKS[type(module)], "config": {key: getattr(module, key) for key in LAYER_CONFIG}}
            if isinstance(module, OnlineNormAct2d):
                layout[name] |= _norm_act_records(module, name)
    return layout


def _module_record(module: nn.Module, name: str) -> dict[str, Any]:
    """``module`` (at qualified ``name``) as ``{"class": ..., "args": {...}}``; BadInputError unless it is rebuildable."""
    kind = type(module).__name__
    if kind not in _REBUILDABLE_MODULES or type(module) is not getattr(nn, kind):
        raise BadInputError(
            f"'{name}' is a {type(module).__module__}.{kind}; a checkpoint records the drop and act of an OnlineNormAct2d "
            f"only as one of torch.nn's {', '.join(sorted(_REBUILDABLE_MODULES))}: save the whole model with torch.save instead"
        )
    return {"class": kind, "args": {arg: getattr(module, arg) for arg in _REBUILDABLE_MODULES[kind]}}


def _norm_act_records(norm: nn.Module, name: str) -> dict[str, dict[str, Any]]:
    return {part: _module_record(getattr(norm, part), f"{name}.{part}") for part in _NORM_ACT_PARTS}


def inferred_layout(
    module: nn.Module, state_dict: Mapping[str, Any], options: ConvertOptions, source: Path | str
) -> Layout:
    """The layout of a converted model whose file records none, read off its ``state_dict``.

    The layers are those the state dict holds OnlineNorm state for (control accumulators
    ``u_ctrl``) where ``module`` has a BatchNorm; their width comes from that state, their
    rank from the BatchNorm's class, ``eps`` from the BatchNorm, ``alpha_mode`` from whether the
    state holds an adaptive alpha, the rest from ``options``;
    a norm-act layer (one holding ``drop`` and ``act`` modules) keeps its drop and act.
    """
    own = module.state_dict().keys()
    layout = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "u_ctrl" or key in own:
            continue
        norm = _module_at(module, prefix, source)
        rank = next(
            (r for cls, r in _BATCH_NORM_RANKS if isinstance(norm, cls)),
            2 if type(norm).__name__ in _FROZEN_NORMS else None,
        )
        if rank is None:
            raise BadInputError(
                f"{quoted(source)}: cannot tell from a state dict which OnlineNorm replaced {type(norm).__name__} '{prefix}'; "
                "save the model with onorm_convert.save_checkpoint(model, path, arch=...), which records it"
            )
        affine = f"{prefix}.weight" in state_dict if prefix else "weight" in state_dict
        config = {**asdict(options), "num_features": value.numel(), "eps": float(norm.eps), "affine": affine}
        # The state says which alpha_mode made it (files from before it existed hold fixed-alpha layers).
        config["alpha_mode"] = ADAPTIVE if f"{prefix}.alpha_now" in state_dict else FIXED
        layout[prefix] = {"rank": rank, "config": config}
        if all(isinstance(getattr(norm, part, None), nn.Module) for part in _NORM_ACT_PARTS):  # a norm-act layer
            layout[prefix] |= _norm_act_records(norm, prefix)
    return layout


def restore_layout(module: nn.Module, layout: Layout, source: Path | str) -> nn.Module:
    """``module`` (the BatchNorm original) with each layer of ``layout`` swapped for the OnlineNorm it describes."""
    replacements = {}
    for name, entry in layout.items():
        norm = _module_at(module, name, source)
        if not (isinstance(norm, (_NormBase, OnlineNormBase)) or type(norm).__name__ in _FROZEN_NORMS):
            raise BadInputError(
                f"{quoted(source)}: the checkpoint records an OnlineNorm at '{name}', where the model has a {type(norm).__name__}; "
                "the file was written for other model code: pass the --arch it was converted from"
            )
        try:
            replacements[id(norm)] = _rebuilt_layer(entry, type(norm))
        except (KeyError, TypeError, ValueError) as err:
            raise BadInputError(
                f"{quoted(source)}: onorm checkpoint field 'layers' is malformed at '{name}' ({err}); the file is damaged"
            ) from err
    return swap_modules(module, replacements)


def _rebuilt_layer(entry: Mapping[str, Any], replaced: type[nn.Module]) -> OnlineNormBase:
    """The OnlineNorm a layout entry describes; an OnlineNormAct2d reverts to ``replaced``, the class it stands in for."""
    if "act" not in entry:
        return ONLINE_NORMS[entry["rank"]](**entry["config"])
    parts = {part: getattr(nn, entry[part]["class"])(**entry[part]["args"]) for part in _NORM_ACT_PARTS}
    layer = OnlineNormAct2d(**entry["config"], **parts)
    layer.reverts_to = replaced
    return layer


def recorded_options(conversion: Mapping[str, Any], source: Path | str) -> ConvertOptions:
    """The layer options in a checkpoint's ``conversion`` record (defaults for what it lacks); BadInputError naming a bad one."""
    try:
        return ConvertOptions(
            **{option.name: conversion[option.name] for option in fields(ConvertOptions) if option.name in conversion}
        )
    except OptionError as err:
        raise BadInputError(
            f"{quoted(source)}: onorm checkpoint field 'conversion' is malformed: it holds {err.option}={err.value!r}, which {err.requirement}; "
            "the file is damaged, convert the model again"
        ) from err
    except (TypeError, ValueError) as err:  # a recorded option of the wrong type
        raise BadInputError(
            f"{quoted(source)}: onorm checkpoint field 'conversion' is malformed ({err}); the file is damaged, convert the model again"
        ) from err


def is_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) claims to be an onorm checkpoint."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT_TAG


def validate_checkpoint(obj: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """Check the fields of a loaded onorm checkpoint; BadInputError naming the first bad one."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadInputError(
            f"{quoted(source)}: onorm checkpoint format version {version!r} is not supported (this onorm reads up to "
            f"{FORMAT_VERSION}); upgrade onorm"
        )
    expected = {"arch": str, "arch_kwargs": Mapping, "conversion": Mapping, "input_shapes": list, "state_dict": Mapping}
    if version >= 2:
        expected["layers"] = Mapping
    shapes_ok = all(
        isinstance(shape, (list, tuple)) and all(type(d) is int and d > 0 for d in shape)
        for shape in obj.get("input_shapes") or []
    )
    optional = {
        "signature": lambda v: v is None or (isinstance(v, str) and _SIGNATURE.fullmatch(v)),
        "arch_location": lambda v: v is None or (isinstance(v, str) and len(v) <= 4096),
        "tool_version": lambda v: v is None or (isinstance(v, str) and len(v) <= 64),
    }
    for field, valid in optional.items():
        if not valid(obj.get(field)):
            raise BadInputError(
                f"{quoted(source)}: onorm checkpoint field {field!r} is malformed; the file is damaged, convert the model again"
            )
    for field, kind in expected.items():
        malformed = (
            not isinstance(obj.get(field), kind)
            or (field == "arch" and not _ARCH_SPEC.fullmatch(obj[field]))
            or (field in ("arch_kwargs", "conversion") and not _json_like(obj[field]))
            or (field == "conversion" and not _is_conversion(obj[field]))
            or (field == "input_shapes" and not shapes_ok)
            or (field == "layers" and not all(_is_layer_entry(name, entry) for name, entry in obj[field].items()))
        )
        if malformed:
            raise BadInputError(
                f"{quoted(source)}: onorm checkpoint field {field!r} is missing or malformed; the file is damaged, convert the model again"
            )
    recorded_options(obj["conversion"], source)
    return dict(obj)


def _json_like(value: Any, depth: int = 0) -> bool:
    """Plain data, at most ``MAX_DEPTH`` deep, with str keys."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, Mapping):
        return all(isinstance(key, str) and _json_like(item, depth + 1) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(_json_like(item, depth + 1) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _is_conversion(conversion: Mapping[str, Any]) -> bool:
    """Known keys only; globs as lists of str, frozen_bn a bool (the layer options are checked by ConvertOptions)."""
    globs_ok = all(
        isinstance(conversion.get(k, []), list) and all(isinstance(g, str) for g in conversion.get(k, []))
        for k in ("include", "exclude")
    )
    return set(conversion) <= CONVERSION_OPTIONS and globs_ok and isinstance(conversion.get("frozen_bn", False), bool)


def _is_layer_entry(name: Any, entry: Any) -> bool:
    return (
        isinstance(name, str)
        and isinstance(entry, Mapping)
        and entry.get("rank") in ONLINE_NORMS
        and isinstance(entry.get("config"), Mapping)
        and set(entry["config"]) <= set(LAYER_CONFIG)
        and _norm_act_parts_valid(entry)
    )


def _norm_act_parts_valid(entry: Mapping[str, Any]) -> bool:
    """No drop/act recorded (a plain OnlineNorm), or both, each a rebuildable module, on a rank-2 layer."""
    extra = set(entry) - {"rank", "config"}
    if not extra:
        return True
    return extra == set(_NORM_ACT_PARTS) and entry["rank"] == 2 and all(_is_module_record(entry[p]) for p in extra)


def _is_module_record(record: Any) -> bool:
    """``{"class": one of _REBUILDABLE_MODULES, "args": {its constructor arguments: plain values}}``."""
    return (
        isinstance(record, Mapping)
        and set(record) == {"class", "args"}
        and record["class"] in _REBUILDABLE_MODULES
        and isinstance(record["args"], Mapping)
        and set(record["args"]) <= set(_REBUILDABLE_MODULES[record["class"]])
        and all(isinstance(value, (str, int, float, bool)) for value in record["args"].values())
    )


def _module_at(model: nn.Module, name: str, source: Path | str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise BadInputError(
            f"{quoted(source)}: the file holds a layer '{name}' that the model built by the arch code lacks; pass the --arch it was converted from"
        ) from err
