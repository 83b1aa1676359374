"""Fold frozen normalization layers into the layers that feed them, for deployment.

With frozen statistics an OnlineNorm (or BatchNorm) layer is a per-channel affine map
``scale * x + shift`` followed by its error compensation (ECM). Where a Conv,
ConvTranspose or Linear module feeds the layer and nothing else reads its output,
the affine map folds into that module's weight and bias and the layer disappears;
a kept clamp stays as a :class:`Clamp` after it, layer scaling as a :class:`LayerScale`,
and an :class:`~onorm_convert.layers.OnlineNormAct2d`'s drop and act after those.
Otherwise the layer becomes one :class:`ChannelAffine` (plus what follows it).

A norm or producer subclass that computes more than the class it extends
(:func:`onorm_convert.shared.added_behaviour`: timm's unconverted ``BatchNormAct2d``, a
``StdConv2d``) is never folded as a plain one; a producer subclass that computes the
same (torchvision's ``Conv3DSimple``) folds like its base.

Producers are found on the ``torch.fx`` graph; a model ``torch.fx`` cannot trace is
still folded, layer by layer into standalone affine modules, and the report says why.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .errors import BadInputError, first_line
from .inputs import run_model
from .layers import ADAPTIVE_BUFFERS, ONLINE_NORMS, STATE_BUFFERS, OnlineNormAct2d, OnlineNormBase
from .layers.functional import CLAMP, LAYER_SCALING, frozen_affine, layer_scale
from .shared import BATCH_NORM_STATE, PRODUCER_STATE, added_behaviour, nearest_known, non_finite_state

NORM_TYPES = (OnlineNormBase, _BatchNorm)
_ONLINE_NORM_STATE = frozenset({"weight", "bias", *STATE_BUFFERS, *ADAPTIVE_BUFFERS})
# The norms that are a frozen per-channel affine map (then their ECM, then drop and act), by their direct state;
# the concrete classes name the base in messages, the abstract ones cover other direct subclasses.
_PLAIN_NORMS: dict[type, frozenset[str]] = {
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, _BatchNorm), BATCH_NORM_STATE),
    **dict.fromkeys((*ONLINE_NORMS.values(), OnlineNormBase), _ONLINE_NORM_STATE),
    OnlineNormAct2d: _ONLINE_NORM_STATE | {"drop", "act"},
}
# The producers an affine map folds into, and their subclasses that compute the same.
_PRODUCERS: dict[type, frozenset[str]] = {
    cls: PRODUCER_STATE
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
}
PRODUCER_TYPES = tuple(_PRODUCERS)


class FoldAction(str, Enum):
    """What folding did with one normalization layer; the values are what reports and JSON show."""

    FOLDED = "folded"  # into its producer's weight and bias
    AFFINE = "affine"  # replaced by a standalone per-channel op (no producer it could fold into)
    KEPT = "kept"  # left unchanged (it is not a fixed affine map)

    def __str__(self) -> str:
        return self.value  # "folded", not "FoldAction.FOLDED", in str() and (from Python 3.12) f-strings


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (dim 1): a frozen normalization that had no producer to fold into.

    Computed as an inference batch norm with mean 0, variance 1 and eps 0 (so exactly
    ``x * scale + shift``): it exports as one ``BatchNormalization`` op, op for op what the
    BatchNorm original exports, instead of a Mul and an Add.
    """

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)
        if x.ndim < 2:  # batch_norm needs a channel dim; (C,) inputs are rare enough for plain arithmetic
            return x * scale + shift
        return F.batch_norm(x, torch.zeros_like(scale), torch.ones_like(scale), scale, shift, training=False, eps=0.0)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class Clamp(nn.Module):
    """The activation-clamping ECM kept for inference: ``clamp(x, -value, value)`` (ONNX ``Clip``)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = float(value)

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(-self.value, self.value)

    def extra_repr(self) -> str:
        return f"value={self.value}"


class LayerScale(nn.Module):
    """The layer-scaling ECM, which cannot be folded: ``x / sqrt(mean(x^2) + eps)`` per sample."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return layer_scale(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@dataclass
class FoldStep:
    """What happened to one normalization layer."""

    norm: str  # qualified name of the layer in the model
    kind: str  # its class, e.g. "OnlineNorm2d"
    action: FoldAction  # FOLDED into `into`, AFFINE or KEPT
    into: str | None  # the producer it was folded into
    ecm: str  # what is left of its error compensation
    reason: str  # why it was not folded ("" when it was)


@dataclass
class FoldReport:
    """The fold plan as carried out: one step per normalization layer."""

    strip_clamp: bool
    traced: bool  # False: torch.fx could not trace the model; every layer became a standalone op
    trace_error: str | None
    steps: list[FoldStep] = field(default_factory=list)

    def count(self, action: FoldAction | str) -> int:
        """How many layers had ``action``."""
        return sum(step.action == action for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def frozen_norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)``, in float64, equal to ``norm`` in eval mode before its ECM.

    Args:
        norm: an ``OnlineNorm*d`` or a ``BatchNorm*d`` with running statistics.

    Returns:
        ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.
    """

    def as64(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(torch.float64)

    return frozen_affine(as64(norm.weight), as64(norm.bias), as64(norm.running_mean), as64(norm.running_var), norm.eps)


def fold_affine_weights(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, transposed: bool = False, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold a per-output-channel affine map into a Conv, ConvTranspose or Linear weight and bias.

    ``W'[o] = W[o] * scale[o]`` and ``b'[o] = (b[o] or 0) * scale[o] + shift[o]``, computed
    in float64 and returned in the dtype of ``weight``.

    Args:
        weight: ``(out, in/groups, *k)`` for Conv and Linear; ``(in, out/groups, *k)`` for ConvTranspose.
        bias: ``(out,)`` or None.
        scale, shift: ``(out,)``.
        transposed: the weight is a ConvTranspose weight, whose output-channel axis is dim 1 within each group.
        groups: the ConvTranspose groups (ignored otherwise).

    Returns:
        The folded ``(weight, bias)``.
    """
    w = weight.detach().to(torch.float64)
    if transposed:
        # (in, out/groups, *k) -> (groups, in/groups, out/groups, *k): output channel g*out/groups + j.
        grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        folded_w = (grouped * scale.reshape(groups, 1, -1, *(1,) * (w.ndim - 2))).reshape(w.shape)
    else:
        folded_w = w * scale.reshape(-1, *(1,) * (w.ndim - 1))
    b = torch.zeros_like(shift) if bias is None else bias.detach().to(torch.float64)
    folded_b = b * scale + shift
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return folded_w.to(weight.dtype), folded_b.to(bias_dtype)


def output_channels(producer: nn.Module) -> int:
    """Number of output channels (features) of a Conv, ConvTranspose or Linear module."""
    return producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels


def fold_into_producer(producer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Replace ``producer``'s weight and bias (in place) by their folds with ``(scale, shift)``."""
    transposed = isinstance(producer, _ConvNd) and producer.transposed
    groups = producer.groups if isinstance(producer, _ConvNd) else 1
    weight, bias = fold_affine_weights(
        producer.weight, producer.bias, scale, shift, transposed=transposed, groups=groups
    )
    producer.weight = nn.Parameter(weight, requires_grad=producer.weight.requires_grad)
    producer.bias = nn.Parameter(bias, requires_grad=producer.weight.requires_grad)


def ecm_module(norm: nn.Module, strip_clamp: bool) -> tuple[nn.Module | None, str]:
    """The module that carries ``norm``'s error compensation after folding, and a description of it."""
    ecm = getattr(norm, "ecm", "none")  # BatchNorm has none
    if ecm == CLAMP:
        if strip_clamp:
            return None, "clamp stripped"
        return Clamp(norm.clamp_bound), f"clamp ±{norm.clamp_bound:g} kept"
    if ecm == LAYER_SCALING:
        return LayerScale(norm.ls_eps), "layer scaling kept (cannot be folded or stripped)"
    return None, "none"


def after_affine(norm: nn.Module, strip_clamp: bool) -> tuple[list[nn.Module], str]:
    """The modules that follow ``norm``'s folded affine map (its ECM, then an OnlineNormAct2d's drop and act) and the ECM's description."""
    ecm, ecm_text = ecm_module(norm, strip_clamp)
    tail = [norm.drop, norm.act] if isinstance(norm, OnlineNormAct2d) else []
    return [m for m in (ecm, *tail) if m is not None and not isinstance(m, nn.Identity)], ecm_text


def unfoldable_reason(norm: nn.Module) -> str | None:
    """Why ``norm`` cannot become a frozen affine map at all, or None if it can."""
    base, holds = nearest_known(norm, _PLAIN_NORMS)
    if extra := added_behaviour(norm, base, holds):
        return f"{extra}, so it is kept as it is and exported as its own ops"
    if norm.running_mean is None or norm.running_var is None:
        return "uses batch statistics in eval mode (track_running_stats=False), so it is not a fixed affine map"
    return None


def checked_affine(name: str, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """:func:`frozen_norm_affine`, refusing statistics or parameters that give NaN/Inf."""
    scale, shift = frozen_norm_affine(norm)
    if non_finite_state(norm) is not None or not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        raise BadInputError(
            f"layer '{name}' ({type(norm).__name__}): its running statistics or affine parameters are not finite "
            "(NaN/Inf, or running_var + eps <= 0); the model file is corrupt: retrain or reconvert it"
        )
    return scale, shift


def standalone_module(scale: Tensor, shift: Tensor, after: Sequence[nn.Module]) -> nn.Module:
    """One per-channel affine op, followed by the modules ``after`` it (see :func:`after_affine`)."""
    return chained([ChannelAffine(scale.to(torch.float32), shift.to(torch.float32)), *after])


def chained(modules: Sequence[nn.Module]) -> nn.Module:
    """``modules`` applied in turn, as one module (the module itself when there is one)."""
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


class _NormLeafTracer(fx.Tracer):
    """fx tracer that keeps normalization layers and producers as single ``call_module`` nodes.

    A producer subclass from any library (torchvision's ``Conv3DSimple``) would otherwise be
    traced into and its conv lost to the fold; as a node, it folds or the report says why not.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, NORM_TYPES + PRODUCER_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters registered in more than one place (tied weights must not be folded)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, n in counts.items() if n > 1}


def _producer_or_reason(
    node: fx.Node, modules: dict[str, nn.Module], calls: Counter, shared: set[int], ranks: dict[str, int]
) -> tuple[fx.Node | None, str]:
    """The node of the module ``node``'s norm can fold into, or None and why not."""
    norm = modules[node.target]
    if calls[node.target] > 1:
        return None, "the layer is called more than once"
    if len(node.args) != 1 or node.kwargs:
        return None, "the layer is not called with a single input"
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = f"{src.op} {getattr(src.target, '__name__', src.target)}" if isinstance(src, fx.Node) else repr(src)
        return None, f"its input is not the output of a Conv/ConvTranspose/Linear module (it comes from {what})"
    producer = modules[src.target]
    known = nearest_known(producer, _PRODUCERS)
    if known is None:
        return (
            None,
            f"its input comes from '{src.target}' ({type(producer).__name__}), which cannot absorb an affine map",
        )
    if extra := added_behaviour(producer, *known):
        return None, f"its input comes from '{src.target}': {extra}, which an affine map cannot fold into"
    others = [user.name for user in src.users if user is not node]
    if others:
        return None, f"the output of '{src.target}' also feeds {', '.join(others)}"
    if calls[src.target] > 1:
        return None, f"'{src.target}' is called more than once"
    if output_channels(producer) != norm.num_features:
        return None, f"'{src.target}' has {output_channels(producer)} outputs, the layer {norm.num_features} channels"
    if id(producer.weight) in shared:
        return None, f"the weight of '{src.target}' is shared with another layer"
    if isinstance(producer, nn.Linear) and ranks.get(src.target, 2) != 2:
        return (
            None,
            f"'{src.target}' outputs rank {ranks[src.target]}: its feature axis is not the layer's channel axis",
        )
    return src, ""


def _linear_output_ranks(gm: fx.GraphModule, example_inputs: Sequence[Tensor] | None) -> dict[str, int]:
    """Output rank of each Linear module feeding a normalization layer, from one run ({} without inputs or such Linears)."""
    modules = dict(gm.named_modules())
    linears = {
        node.args[0].target
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(modules[node.target], NORM_TYPES) and node.args
        and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module"
        and isinstance(modules[node.args[0].target], nn.Linear)
    }  # fmt: skip
    if example_inputs is None or not linears:
        return {}
    ranks: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:  # returns None: the output is unchanged
            ranks[name] = output.ndim

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in linears]
    try:
        run_model(gm, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


def _fold_graph(gm: fx.GraphModule, strip_clamp: bool, ranks: dict[str, int]) -> list[FoldStep]:
    """Fold every normalization node of ``gm`` (in place); one step per layer."""
    modules = dict(gm.named_modules())
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    shared = _shared_weights(gm)
    steps, seen = [], set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], NORM_TYPES) or node.target in seen:
            continue  # a norm called twice is one layer: one step (it cannot fold, see _producer_or_reason)
        seen.add(node.target)
        norm, name, kind = modules[node.target], node.target, type(modules[node.target]).__name__
        if (reason := unfoldable_reason(norm)) is not None:
            steps.append(FoldStep(name, kind, FoldAction.KEPT, None, "none", reason))
            continue
        scale, shift = checked_affine(name, norm)
        after, ecm_text = after_affine(norm, strip_clamp)
        producer_node, reason = _producer_or_reason(node, modules, calls, shared, ranks)
        if producer_node is None:
            _set_submodule(gm, name, standalone_module(scale, shift, after))
            steps.append(FoldStep(name, kind, FoldAction.AFFINE, None, ecm_text, reason))
            continue
        fold_into_producer(modules[producer_node.target], scale, shift)
        if after:
            _set_submodule(gm, name, chained(after))
        else:
            node.replace_all_uses_with(producer_node)
            gm.graph.erase_node(node)
        steps.append(FoldStep(name, kind, FoldAction.FOLDED, producer_node.target, ecm_text, ""))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return steps


def _fold_standalone(model: nn.Module, strip_clamp: bool, reason: str) -> tuple[list[FoldStep], nn.Module]:
    """Replace every normalization layer of ``model`` (in place) by a standalone affine op; returns the steps and model."""
    steps = []
    for name, norm in [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]:
        kind = type(norm).__name__
        if (why_kept := unfoldable_reason(norm)) is not None:
            steps.append(FoldStep(name, kind, FoldAction.KEPT, None, "none", why_kept))
            continue
        scale, shift = checked_affine(name, norm)
        after, ecm_text = after_affine(norm, strip_clamp)
        if name:
            _set_submodule(model, name, standalone_module(scale, shift, after))
        else:  # the model is a bare norm layer
            model = standalone_module(scale, shift, after)
        steps.append(FoldStep(name or "<model>", kind, FoldAction.AFFINE, None, ecm_text, reason))
    return steps, model


def fold_with_report(
    model: nn.Module, *, strip_clamp: bool = False, example_inputs: Sequence[Tensor] | None = None
) -> tuple[nn.Module, FoldReport]:
    """Fold ``model``'s normalization layers; returns the folded eval-mode copy and what was done.

    Args:
        model: any module; it is deep-copied and never modified.
        strip_clamp: drop OnlineNorm's activation clamp instead of keeping it as a :class:`Clamp`.
        example_inputs: optional inputs; with them the rank of each Linear output is checked
            (a norm folds into a Linear only when the Linear's output is ``(N, C)``); without
            them that rank is assumed to be 2.

    Returns:
        ``(folded_model, report)``. ``folded_model`` is an ``fx.GraphModule`` when the model
        could be traced, else the copy with standalone affine modules.
    """
    copied = copy.deepcopy(model).eval()
    try:
        graph = _NormLeafTracer().trace(copied)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: fold without the graph
        reason = f"torch.fx could not trace the model ({type(err).__name__}: {first_line(err)})"
        steps, folded = _fold_standalone(copied, strip_clamp, reason)
        return folded.eval(), FoldReport(strip_clamp, False, reason, steps)
    gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    steps = _fold_graph(gm, strip_clamp, _linear_output_ranks(gm, example_inputs))
    return gm.eval(), FoldReport(strip_clamp, True, None, steps)


def fold(model: nn.Module, *, strip_clamp: bool = False, example_inputs: Sequence[Tensor] | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with every normalization layer folded (see :func:`fold_with_report`)."""
    return fold_with_report(model, strip_clamp=strip_clamp, example_inputs=example_inputs)[0]
