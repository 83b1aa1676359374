"""BatchNorm -> OnlineNorm conversion (and back), one registered converter per module type.

Conversion keeps what a trained model computes: each OnlineNorm starts from the
BatchNorm's ``running_mean``/``running_var``, keeps its ``eps`` and takes over its very
``weight``/``bias`` parameters, so in eval mode with the ECM off the converted model
computes what the original did (:func:`onorm_convert.verify.check_conversion` proves it on example inputs).
A layer onorm cannot convert faithfully is left alone with a :class:`ConversionWarning`.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BadInputError
from .inputs import random_inputs, run_model
from .layers import ONLINE_NORMS, OnlineNorm1d, OnlineNorm2d, OnlineNorm3d, OnlineNormAct2d, OnlineNormBase
from .options import ConvertOptions
from .shared import (
    BATCH_NORM_STATE,
    NORM_ACT_STATE,
    added_behaviour,
    check_model_values,
    eval_mode,
    nearest_known,
    non_finite_state,
    swap_modules,
)

BATCH_NORMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}
_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)


class ConversionWarning(UserWarning):
    """A layer left alone, statistics started fresh, or nothing to convert."""


@dataclass(frozen=True)
class Converter:
    """How one normalization type becomes an OnlineNorm.

    ``to_online(module, online_cls, options)`` builds the replacement; ``dim`` is the
    spatial rank it normalizes (None: decided from the example input or the
    neighbouring layer); ``on_request``: converted only when asked (``frozen_bn=True``);
    ``online``: the class it converts to (None: the OnlineNorm of its rank); ``holds``: the
    direct state of the registered type (what the converter carries over).
    """

    to_online: Callable[[nn.Module, type[OnlineNormBase], ConvertOptions], OnlineNormBase]
    dim: int | None
    on_request: bool = False
    online: type[OnlineNormBase] | None = None
    holds: frozenset[str] = BATCH_NORM_STATE

    def online_class(self, dim: int) -> type[OnlineNormBase]:
        """The OnlineNorm class a layer of spatial rank ``dim`` becomes."""
        return self.online or ONLINE_NORMS[dim]


_REGISTRY: dict[type | str, Converter] = {}


def register_converter(
    module_type: type | str,
    *,
    dim: int | None,
    on_request: bool = False,
    online: type[OnlineNormBase] | None = None,
    holds: frozenset[str] = BATCH_NORM_STATE,
):
    """Register ``fn(module, online_cls, options) -> OnlineNormBase`` for ``module_type``.

    ``module_type`` is a class, or a class name for libraries onorm does not import
    (matched by name, e.g. torchvision's ``"FrozenBatchNorm2d"``). ``online`` is the class
    it converts to (default: the OnlineNorm of the layer's rank) and ``holds`` the type's
    direct parameters, buffers and submodules. Subclasses use their base's converter unless
    they compute more (:func:`onorm_convert.shared.added_behaviour`).
    """

    def decorate(fn):
        _REGISTRY[module_type] = Converter(fn, dim, on_request, online, holds)
        return fn

    return decorate


@dataclass
class LayerChange:
    """What conversion does (or would do) to one normalization layer."""

    name: str  # qualified name ("<model>" for the root); the first of its names when shared
    old_type: str
    new_type: str | None  # None: left alone
    channels: int
    stats: str  # where the OnlineNorm statistics come from
    note: str = ""  # why it is left alone, or how its dimension was chosen
    aliases: list[str] = field(default_factory=list)  # every other name of a shared module
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    dim: int | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields (no module)."""
        return {k: getattr(self, k) for k in ("name", "old_type", "new_type", "channels", "stats", "note", "aliases")}


def convert(
    model: nn.Module,
    *,
    ecm: str | None = ConvertOptions.ecm,
    clamp_value: float = ConvertOptions.clamp_value,
    alpha_fwd: float = ConvertOptions.alpha_fwd,
    alpha_bkw: float = ConvertOptions.alpha_bkw,
    control: str = ConvertOptions.control,
    clamp_mode: str = ConvertOptions.clamp_mode,
    alpha_mode: str = ConvertOptions.alpha_mode,
    projection: str = ConvertOptions.projection,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    inplace: bool = False,
    frozen_bn: bool = False,
    example_shapes: Sequence[Sequence[int]] | None = None,
) -> nn.Module:
    """``model`` with its BatchNorms replaced by OnlineNorms that start from what each BatchNorm learned.

    Args:
        model: any ``nn.Module``; with ``inplace=False`` (the default) it is left untouched.
        ecm: error compensation: ``"clamp"``, ``"layer_scaling"`` (or ``"layer-scaling"``) or ``"none"``.
        clamp_value: the clamp's c; with ``clamp_mode="affine"`` a layer bounds its output z by
            ``max(|bias| + c * |weight|)``, what ``|y| <= c`` implies; with ``"fixed"`` by c itself.
        alpha_fwd: the decay of the streaming statistics (the doc's 0.999 suits training from scratch;
            the default, 0.99, lets a converted model train on at BatchNorm's learning rate).
        alpha_bkw: the decay of the backward control processes (doc 0.99, default 0.9).
        control: ``"stable"`` (v's decay kept in (0, 1]) or ``"exact"`` (the doc's equations).
        clamp_mode: ``"affine"`` (keeps a trained model's outputs) or ``"fixed"`` (the doc's).
        alpha_mode: ``"adaptive"`` (each layer's alpha_fwd, starting at ``alpha_fwd``, follows the drift
            its statistics see; :mod:`onorm_convert.layers.adaptive_alpha`) or ``"fixed"`` (the doc's).
        projection: ``"batch"`` (in a batch of two samples or more, the input gradient is BatchNorm's
            projection, within the batch, of the gradient with the statistics held constant) or
            ``"none"`` (the doc's controls).
        include, exclude: glob patterns over qualified module names; a shared module matches
            through any of its names.
        inplace: convert ``model`` itself. Its Parameter objects are kept, so an optimizer built
            on it before converting (and any state loaded into it) goes on training the
            converted model; a copy has new Parameters, so build the optimizer after converting.
        frozen_bn: also convert torchvision's ``FrozenBatchNorm2d`` (its buffers become trainable).
        example_shapes: input shapes to run random inputs through, to learn the dimension of
            SyncBatchNorm layers (else it comes from the neighbouring layer).

    Returns the converted model, in the training mode each layer had. Raises
    :class:`~onorm_convert.errors.OptionError` for an option out of range and BadInputError
    for a model that cannot be converted (lazy or damaged BatchNorms). Each layer left alone
    is a :class:`ConversionWarning`; :func:`convert_with_report` also returns what was done.
    """
    options = ConvertOptions(ecm, clamp_value, alpha_fwd, alpha_bkw, control, clamp_mode, alpha_mode, projection)
    return convert_with_report(
        model,
        options,
        include=include,
        exclude=exclude,
        inplace=inplace,
        frozen_bn=frozen_bn,
        example_shapes=example_shapes,
    )[0]


def convert_with_report(
    model: nn.Module,
    options: ConvertOptions | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    inplace: bool = False,
    frozen_bn: bool = False,
    example_shapes: Sequence[Sequence[int]] | None = None,
) -> tuple[nn.Module, list[LayerChange]]:
    """:func:`convert` with the layer settings as one :class:`ConvertOptions`, and a report.

    Returns the converted model and one :class:`LayerChange` per normalization layer; emits
    a :class:`ConversionWarning` for each layer left alone, each started from fresh
    statistics, and when there is nothing to convert. ``options=None`` means the defaults.
    """
    options = options or ConvertOptions()
    _refuse_lazy(model)  # before copying: uninitialized parameters cannot be deep-copied
    if not inplace:
        model = copy.deepcopy(model)
    changes = plan_conversion(
        model, include=include, exclude=exclude, frozen_bn=frozen_bn, example_shapes=example_shapes
    )
    check_model_values(model, "converting")
    for pattern in unmatched_globs(model, include):
        warnings.warn(f"--include {pattern!r} matches no module of the model", ConversionWarning, stacklevel=2)
    replacements = {}
    for change in changes:
        if change.new_type is None:
            if not isinstance(change.module, OnlineNormBase):
                warnings.warn(
                    f"'{change.name}' ({change.old_type}) left as is: {change.note}", ConversionWarning, stacklevel=2
                )
            continue
        converter = find_converter(change.module)
        online = converter.to_online(change.module, converter.online_class(change.dim), options)
        online.layer_name = change.name  # named in the layer's own errors
        online.train(change.module.training)
        replacements[id(change.module)] = online
        if change.stats.startswith("fresh"):
            warnings.warn(
                f"'{change.name}' tracked no running statistics: its OnlineNorm starts fresh (mean 0, var 1), "
                "so the converted model computes differently until trained",
                ConversionWarning,
                stacklevel=2,
            )
    if not replacements:
        warnings.warn(
            f"{why_nothing_converts(model, changes)}; it is returned unchanged", ConversionWarning, stacklevel=2
        )
    return swap_modules(model, replacements), changes


def plan_conversion(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    frozen_bn: bool = False,
    example_shapes: Sequence[Sequence[int]] | None = None,
) -> list[LayerChange]:
    """What :func:`convert_with_report` would do to each normalization layer of ``model``, changing nothing."""
    _refuse_lazy(model)
    names = _all_names(model)
    candidates = [m for m in names if isinstance(m, OnlineNormBase) or _is_normalization(m)]
    observed = _observed_ranks(model, candidates, example_shapes)
    changes = []
    for module in candidates:
        first, *aliases = names[module]
        converter = find_converter(module)
        change = LayerChange(
            first, type(module).__name__, None, _channels(module), _stats_source(module), aliases=aliases, module=module
        )
        change.note = _reason_to_skip(module, converter, names[module], include, exclude, frozen_bn)
        if not change.note:
            change.dim, change.note = _dimension(model, module, converter, observed)
            change.new_type = converter.online_class(change.dim).__name__
        changes.append(change)
    return changes


def find_converter(module: nn.Module) -> Converter | None:
    """The converter registered for ``module``'s class or its nearest registered base (by class or by name)."""
    found = nearest_known(module, _REGISTRY)
    return None if found is None else found[1]


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """OnlineNorm layers back to BatchNorm with the frozen statistics, for tools that only know BatchNorm.

    The BatchNorm computes ``weight * (x - mean) / sqrt(var + eps) + bias``: the eval output
    without the ECM. Layers with a clamp or layer scaling get a :class:`ConversionWarning`,
    since the BatchNorm cannot apply it. Parameters are the same tensors.

    An :class:`OnlineNormAct2d` becomes the BatchNorm class it replaced (``reverts_to``, e.g.
    timm's ``BatchNormAct2d``) built as ``cls(num_features, eps=..., affine=...)`` and given
    the same ``drop`` and ``act`` modules; where that class is unknown, is no BatchNorm (timm's
    ``FrozenBatchNormAct2d``) or cannot be built so, it becomes
    ``nn.Sequential(BatchNorm2d, drop, act)``, which computes the same.
    """
    if not inplace:
        model = copy.deepcopy(model)
    names = _all_names(model)
    online = [m for m in names if isinstance(m, OnlineNormBase)]
    with_ecm = [names[m][0] for m in online if m.ecm != "none"]
    if with_ecm:
        warnings.warn(
            f"BatchNorm cannot apply the clamp or layer-scaling ECM of {', '.join(map(repr, with_ecm))}; "
            "the reverted layers compute the output without it",
            ConversionWarning,
            stacklevel=2,
        )
    return swap_modules(model, {id(m): _reverted(m) for m in online})


# --- the registered converters ----------------------------------------------------------------


@register_converter(nn.BatchNorm1d, dim=1)
@register_converter(nn.BatchNorm2d, dim=2)
@register_converter(nn.BatchNorm3d, dim=3)
@register_converter(nn.SyncBatchNorm, dim=None)
def online_from_batchnorm(
    bn: nn.modules.batchnorm._NormBase, online_cls: type[OnlineNormBase], options: ConvertOptions
) -> OnlineNormBase:
    """An OnlineNorm equal to ``bn`` in eval mode: its weight/bias parameters, running statistics and eps."""
    online = _new_online(bn, online_cls, options, affine=bn.affine)
    if bn.affine:
        online.weight, online.bias = bn.weight, bn.bias
    if bn.track_running_stats and bn.running_mean is not None:
        _copy_stats(online, bn.running_mean, bn.running_var)
    return online


@register_converter("FrozenBatchNorm2d", dim=2, on_request=True)
def online_from_frozen_batchnorm(
    bn: nn.Module, online_cls: type[OnlineNormBase], options: ConvertOptions
) -> OnlineNormBase:
    """An OnlineNorm equal to torchvision's FrozenBatchNorm2d in eval; its buffers become trainable parameters."""
    online = _new_online(bn, online_cls, options, affine=True)
    online.weight = nn.Parameter(bn.weight.detach().clone())
    online.bias = nn.Parameter(bn.bias.detach().clone())
    _copy_stats(online, bn.running_mean, bn.running_var)
    return online


# timm's norm-act layers, matched by name so that timm stays optional.
@register_converter("BatchNormAct2d", dim=2, online=OnlineNormAct2d, holds=NORM_ACT_STATE)
@register_converter("SyncBatchNormAct", dim=2, online=OnlineNormAct2d, holds=NORM_ACT_STATE)
def online_from_batchnorm_act(
    bn: nn.Module, online_cls: type[OnlineNormAct2d], options: ConvertOptions
) -> OnlineNormAct2d:
    """An OnlineNormAct2d equal to timm's BatchNormAct2d (or SyncBatchNormAct) in eval: the norm, then its own drop and act."""
    return _with_drop_and_act(online_from_batchnorm(bn, online_cls, options), bn)


@register_converter("FrozenBatchNormAct2d", dim=2, on_request=True, online=OnlineNormAct2d, holds=NORM_ACT_STATE)
def online_from_frozen_batchnorm_act(
    bn: nn.Module, online_cls: type[OnlineNormAct2d], options: ConvertOptions
) -> OnlineNormAct2d:
    """An OnlineNormAct2d equal to timm's FrozenBatchNormAct2d in eval; its buffers become trainable parameters."""
    return _with_drop_and_act(online_from_frozen_batchnorm(bn, online_cls, options), bn)


def _with_drop_and_act(online: OnlineNormAct2d, bn: nn.Module) -> OnlineNormAct2d:
    """``online`` given ``bn``'s very drop and act modules (SyncBatchNormAct may lack them: Identity stays)."""
    online.drop = getattr(bn, "drop", online.drop)
    online.act = getattr(bn, "act", online.act)
    online.reverts_to = type(bn)
    return online


def _new_online(
    bn: nn.Module, online_cls: type[OnlineNormBase], options: ConvertOptions, affine: bool
) -> OnlineNormBase:
    reference = bn.weight if affine and bn.weight is not None else bn.running_mean
    factory = (
        {"device": None, "dtype": None} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    )
    return online_cls(_channels(bn), eps=float(bn.eps), affine=affine, **asdict(options), **factory)


def _copy_stats(online: OnlineNormBase, mean: Tensor, var: Tensor) -> None:
    with torch.no_grad():
        online.running_mean.copy_(mean)
        online.running_var.copy_(var)


def _reverted(online: OnlineNormBase) -> nn.Module:
    """The BatchNorm (with its drop and act, for an OnlineNormAct2d) that computes what ``online`` does without its ECM."""
    if not isinstance(online, OnlineNormAct2d):
        return _to_batchnorm(online, BATCH_NORMS[_rank(online)])
    bn = _original_batchnorm(online)
    if bn is None:
        return nn.Sequential(_to_batchnorm(online, nn.BatchNorm2d), online.drop, online.act).train(online.training)
    bn.drop, bn.act = online.drop, online.act
    return bn


def _original_batchnorm(online: OnlineNormAct2d) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm class ``online`` replaced (``reverts_to``) built from its settings; None where it cannot be."""
    original = online.reverts_to
    if original is None or not issubclass(original, nn.modules.batchnorm._BatchNorm):
        return None
    try:
        return _to_batchnorm(online, original)
    except TypeError:  # its constructor takes other arguments
        return None


def _rank(online: OnlineNormBase) -> int:
    return next(d for d, cls in ONLINE_NORMS.items() if isinstance(online, cls))


def _to_batchnorm(
    online: OnlineNormBase, bn_cls: type[nn.modules.batchnorm._BatchNorm]
) -> nn.modules.batchnorm._BatchNorm:
    reference = online.weight if online.affine else online.running_mean
    bn = bn_cls(
        online.num_features, eps=online.eps, affine=online.affine, device=reference.device, dtype=reference.dtype
    )
    if online.affine:
        bn.weight, bn.bias = online.weight, online.bias
    with torch.no_grad():
        bn.running_mean.copy_(online.running_mean)
        bn.running_var.copy_(online.running_var)
    return bn.train(online.training)


# --- planning helpers ---------------------------------------------------------------------------


def _refuse_lazy(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if (
            _is_normalization(module)
            and isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()
        ):
            raise BadInputError(
                f"'{name or '<model>'}' is an uninitialized lazy BatchNorm; run one forward pass (or load trained weights) before converting"
            )


def _all_names(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every module of ``model`` with all its qualified names, in definition order."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name or "<model>")
    return names


def unmatched_globs(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """The glob ``patterns`` that match no qualified module name of ``model`` (a typo, or the wrong model)."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    return [p for p in patterns or [] if not any(fnmatch.fnmatchcase(name, p) for name in names)]


def why_nothing_converts(model: nn.Module, changes: list[LayerChange]) -> str:
    """Why nothing was converted, saying what normalization the model does have."""
    batch_norms = [change for change in changes if not isinstance(change.module, OnlineNormBase)]
    if batch_norms:
        return f"none of its {len(batch_norms)} BatchNorm layers was converted ({batch_norms[0].note}{', ...' if len(batch_norms) > 1 else ''})"
    if changes:
        return f"the model has no BatchNorm layer to convert (its {len(changes)} normalization layers are OnlineNorm already)"
    found = Counter(type(m).__name__ for m in model.modules() if isinstance(m, _OTHER_NORMS))
    others = (
        f": found {', '.join(f'{name} x{count}' for name, count in sorted(found.items()))}; onorm converts BatchNorm"
        if found
        else ""
    )
    return f"the model has no BatchNorm layer to convert{others}"


def _is_normalization(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or find_converter(module) is not None


def _channels(module: nn.Module) -> int:
    if hasattr(module, "num_features"):
        return int(module.num_features)
    return int(module.weight.shape[0])  # FrozenBatchNorm2d keeps no num_features


def _stats_source(module: nn.Module) -> str:
    if isinstance(module, OnlineNormBase):
        return "streaming (already OnlineNorm)"
    if getattr(module, "running_mean", None) is None:
        return "fresh (none tracked)"
    return "running_mean/running_var"


def _reason_to_skip(
    module: nn.Module,
    converter: Converter | None,
    names: list[str],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    frozen_bn: bool,
) -> str:
    """Why ``module`` is not converted ("" if it is); BadInputError for what cannot be converted at all."""
    if isinstance(module, OnlineNormBase):
        return "already OnlineNorm"
    if converter is None:
        return f"no converter for {type(module).__name__} (register one with onorm_convert.convert.register_converter)"
    if converter.on_request and not frozen_bn:
        return f"{type(module).__name__} is converted only on request (--frozen-bn)"
    extra = added_behaviour(module, nearest_known(module, _REGISTRY)[0], converter.holds)
    if extra:
        return f"{extra}; converting it would change what it computes"
    if exclude and any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude):
        return "excluded (--exclude)"
    if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
        return "not included (--include)"
    _check_finite_stats(module, names[0])
    return ""


def _check_finite_stats(module: nn.Module, name: str) -> None:
    if (stat := non_finite_state(module)) is not None:
        raise BadInputError(
            f"'{name}': its {stat} contains NaN or Inf; the model is damaged, retrain or fix it before converting"
        )


def _dimension(
    model: nn.Module, module: nn.Module, converter: Converter, observed: dict[nn.Module, int]
) -> tuple[int, str]:
    """The spatial rank to convert ``module`` for, and a note on how it was chosen when not fixed by its type."""
    if converter.dim is not None:
        return converter.dim, ""
    if module in observed:
        return observed[module], "dimension from the example input"
    neighbour = _neighbour_rank(model, module)
    if neighbour is not None:
        return neighbour[0], f"dimension from neighbouring layer '{neighbour[1]}'"
    name = _all_names(model)[module][0]
    raise BadInputError(
        f"'{name}' ({type(module).__name__}): cannot tell whether it normalizes 1d, 2d or 3d inputs; pass --input-shape"
    )


_RANK_OF: tuple[tuple[type, int], ...] = (
    (nn.Linear, 1), (nn.Conv1d, 1), (nn.ConvTranspose1d, 1), (nn.BatchNorm1d, 1), (OnlineNorm1d, 1),
    (nn.Conv2d, 2), (nn.ConvTranspose2d, 2), (nn.BatchNorm2d, 2), (OnlineNorm2d, 2),
    (nn.Conv3d, 3), (nn.ConvTranspose3d, 3), (nn.BatchNorm3d, 3), (OnlineNorm3d, 3),
)  # fmt: skip


def _neighbour_rank(model: nn.Module, module: nn.Module) -> tuple[int, str] | None:
    """The rank of the nearest layer before ``module`` (else after it) in definition order whose rank is known."""
    ordered = list(model.named_modules())
    index = next(i for i, (_, m) in enumerate(ordered) if m is module)
    for name, other in [*reversed(ordered[:index]), *ordered[index + 1 :]]:
        rank = next((r for cls, r in _RANK_OF if type(other) is cls), None)
        if rank is not None:
            return rank, name
    return None


def _observed_ranks(
    model: nn.Module, candidates: list[nn.Module], example_shapes: Sequence[Sequence[int]] | None
) -> dict[nn.Module, int]:
    """Spatial rank of the input each dimension-less candidate sees on random example inputs ({} if none needed or given)."""
    unknown = [m for m in candidates if (c := find_converter(m)) is not None and c.dim is None]
    if not unknown or not example_shapes:
        return {}
    ranks: dict[nn.Module, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        ranks.setdefault(module, args[0].ndim - 2)

    handles = [m.register_forward_pre_hook(record) for m in unknown]
    try:
        with eval_mode(model):
            run_model(model, random_inputs(example_shapes))
    finally:
        for handle in handles:
            handle.remove()
    return {m: max(rank, 1) for m, rank in ranks.items() if rank <= 3}
