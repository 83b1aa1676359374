"""Loading a model file safely, whatever it holds, for every command.

Recognized contents:

* a state dict, or a training checkpoint holding one (``{"state_dict": ...}``,
  ``{"model_state_dict": ...}``, ``{"model": ...}`` or ``key=NAME``), read with
  ``torch.load(weights_only=True)``; the module is built by ``arch="package.module:factory"``.
  The state dict of a converted model (``torch.save(model.state_dict())`` after training) is
  taken with the BatchNorm original's ``arch``: the layers whose OnlineNorm state it holds
  become OnlineNorms first, with the default options, since a state dict records none;
* onorm's own checkpoint (:mod:`onorm_convert.checkpoint`), rebuilt without flags when this
  user's onorm signed it (:mod:`onorm_convert.trust`); any other names code chosen by
  whoever wrote it, so it needs ``arch`` (the user names the code) or ``trust=True``;
* a pickled module (``torch.save(model)``): unpickling runs code from the file, so only
  with ``trust=True``.

TorchScript archives, ``torch.export`` programs and ONNX files are recognized and refused;
anything else (empty, truncated, text, random bytes) is a :class:`BadInputError`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import inferred_layout, is_checkpoint, recorded_options, restore_layout, validate_checkpoint
from .errors import BadInputError, first_line, quoted
from .options import ConvertOptions
from .trust import cwd_importable, signed_by_this_user

PICKLED_MODULE, STATE_DICT, ONORM_CHECKPOINT = "pickled_module", "state_dict", "onorm_checkpoint"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # where training checkpoints usually keep one
_ZIP_MAGIC = b"PK\x03\x04"
_SHOWN_NAMES = 5  # names listed in an error before "and N more"
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


class LoadWarning(UserWarning):
    """The file was read, but with an assumption the user should know of (e.g. default conversion options)."""


@dataclass(frozen=True)
class CodeOrigin:
    """Who named the model code and its keyword arguments, so that messages name them and the right fix."""

    arch: str = "--arch"  # how a message names the arch
    kwargs: str | None = "--arch-kwargs"  # how it names the kwargs; None when there are none
    mismatch_fix: str = "check --arch and --arch-kwargs"  # what to do when the weights do not fit the model

    @classmethod
    def user(cls, kwargs_given: bool) -> CodeOrigin:
        """Code named by the user's ``arch`` (``--arch``), with or without ``--arch-kwargs``."""
        return cls(kwargs="--arch-kwargs" if kwargs_given else None)


@dataclass
class LoadedModel:
    """A model read from a file, with what the file said about it."""

    module: nn.Module
    format: str  # PICKLED_MODULE | STATE_DICT | ONORM_CHECKPOINT
    arch: str | None = None  # "package.module:factory" when known
    arch_kwargs: dict = field(default_factory=dict)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)  # recorded by `onorm convert`; [] if none
    info: dict = field(default_factory=dict)  # other metadata (tool version, conversion options, key)


def read_model(
    path: Path | str,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    key: str | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Read the model in ``path`` (see the module docstring for what is accepted).

    ``arch`` builds the module for a state dict (it overrides the one recorded in an onorm
    checkpoint); ``key`` picks the state dict inside a training checkpoint; ``trust`` allows
    what runs code chosen by the file: unpickling a whole module, or importing the code an
    onorm checkpoint names when this user's onorm did not sign it. Nothing the file names is
    imported or called without that consent. Raises BadInputError with one line saying what
    is wrong and what to do.
    """
    path = Path(path)
    _check_readable(path)
    _refuse_foreign_formats(path)
    if arch is not None and not arch.strip():
        raise BadInputError("--arch '': empty; name the code that builds the model, package.module:factory")
    obj = _safe_load(path, trust)
    if is_checkpoint(obj):
        return _rebuild_checkpoint(validate_checkpoint(obj, path), path, arch, arch_kwargs, trust)
    found, used_key = _select(obj, key, path)
    dropped = (
        sorted(str(name) for name in obj if name != used_key) if used_key is not None else []
    )  # optimizer, epoch, ...
    if isinstance(found, nn.Module):
        return LoadedModel(found, PICKLED_MODULE, info={"key": used_key, "dropped_keys": dropped})
    if arch is None:
        raise BadInputError(
            f"{path}: holds a state dict ({len(found)} entries) but no model code; pass --arch package.module:factory "
            "(and --arch-kwargs JSON) naming the function that builds the model"
        )
    module = build_arch(arch, arch_kwargs or {}, CodeOrigin.user(arch_kwargs is not None))
    info: dict[str, Any] = {"key": used_key, "dropped_keys": dropped}
    layout = inferred_layout(module, _strip_data_parallel_prefix(module, found), ConvertOptions(), path)
    if layout:  # the state dict of a converted model
        module = restore_layout(module, layout, path)
        info["conversion"] = asdict(ConvertOptions())
        _warn_defaults_used(path, len(layout))
    load_state_dict_checked(module, found, path)
    return LoadedModel(module, STATE_DICT, arch, dict(arch_kwargs or {}), info=info)


def load_model(
    path: Path | str,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    key: str | None = None,
    trust: bool = False,
) -> nn.Module:
    """The model in ``path``, ready to use: an onorm checkpoint, a state dict, or (with ``trust``) a pickled module.

    Args:
        path: a file saved with ``torch.save`` (or :func:`onorm_convert.save_checkpoint`).
        arch: ``"package.module:factory"``, the code that builds the model for a state dict
            (the current directory is importable); for an onorm checkpoint it replaces the
            recorded one.
        arch_kwargs: keyword arguments for ``arch``'s factory.
        key: the state dict's key inside a training checkpoint (``"state_dict"``,
            ``"model_state_dict"`` and ``"model"`` are found without it).
        trust: allow what runs code chosen by the file: unpickling a whole module, or the
            model code an onorm checkpoint names that this user's onorm did not write.

    Nothing the file names is imported or run without that consent. Raises BadInputError
    with one line saying what is wrong and what to do. :func:`read_model` also says what
    the file held (format, arch, recorded input shapes).
    """
    return read_model(path, arch=arch, arch_kwargs=arch_kwargs, key=key, trust=trust).module


def build_arch(arch: str, arch_kwargs: Mapping[str, Any], origin: CodeOrigin = CodeOrigin()) -> nn.Module:
    """Import ``"package.module:factory"`` (current directory importable) and call it with ``arch_kwargs``.

    This runs the code ``arch`` names: call it only for code the user consented to.
    ``origin`` says who named it, for the messages.
    """
    where = f"{origin.arch} {arch!r}"
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise BadInputError(f"{where}: expected package.module:factory, e.g. torchvision.models:resnet18")
    with cwd_importable():
        try:
            namespace = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 - any import failure is the user's code or path
            raise BadInputError(
                f"{where}: cannot import {module_name!r} ({type(err).__name__}: {first_line(err)}); "
                "run onorm from the folder that contains it or install the package"
            ) from err
    factory = namespace
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise BadInputError(f"{where}: {module_name!r} has no attribute {attr!r}; check the name after ':'")
        factory = getattr(factory, part)
    if not callable(factory):
        raise BadInputError(f"{where}: {attr!r} is a {type(factory).__name__}, not callable; name a class or function")
    try:
        module = factory(**arch_kwargs)
    except Exception as err:  # noqa: BLE001 - the factory is user code
        raise BadInputError(
            f"{where}: {_call_failure(origin, arch_kwargs)} ({type(err).__name__}: {first_line(err)}); {_call_fix(origin)}"
        ) from err
    if not isinstance(module, nn.Module):
        raise BadInputError(f"{where}: returned a {type(module).__name__}, not a torch.nn.Module; name a model factory")
    return module


def _call_failure(origin: CodeOrigin, arch_kwargs: Mapping[str, Any]) -> str:
    return (
        f"calling it with {origin.kwargs} {_shown(dict(arch_kwargs))} failed"
        if origin.kwargs
        else "calling it without arguments failed"
    )


def _call_fix(origin: CodeOrigin) -> str:
    if origin.kwargs == "--arch-kwargs":
        return "fix --arch-kwargs"
    if origin.kwargs:
        return f"pass --arch-kwargs to replace {origin.kwargs}"
    return "pass --arch-kwargs if it needs arguments"


def load_state_dict_checked(
    module: nn.Module, state_dict: Mapping[str, Any], source: Path | str, origin: CodeOrigin = CodeOrigin()
) -> None:
    """Load ``state_dict`` into ``module`` exactly; BadInputError naming missing, unexpected or misshaped keys.

    A state dict saved from ``nn.DataParallel`` (every key prefixed ``module.``) is accepted.
    ``origin`` says who named the code that built ``module``, for the messages.
    """
    source = quoted(source)
    state_dict = _strip_data_parallel_prefix(module, state_dict)
    complex_values = [name for name, value in state_dict.items() if isinstance(value, Tensor) and value.is_complex()]
    if complex_values:  # load_state_dict would silently keep only their real parts
        raise BadInputError(
            f"{source}: {_names(complex_values)} {'holds' if len(complex_values) == 1 else 'hold'} complex numbers, which BatchNorm models cannot use; save real weights"
        )
    expected = module.state_dict().keys()
    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it).
    missing = [name for name in expected if name not in state_dict and not name.endswith("num_batches_tracked")]
    unexpected = [name for name in state_dict if name not in expected]
    problems = [f"{label} {_names(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise BadInputError(
            f"{source}: the weights do not match the model built by {origin.arch}: {'; '.join(problems)}; {origin.mismatch_fix}"
        )
    try:
        module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # torch reports shape mismatches as one line per tensor
        mismatches = _SIZE_MISMATCH.findall(str(err))
        if not mismatches:
            raise BadInputError(
                f"{source}: the weights cannot be loaded into the model built by {origin.arch} ({first_line(err)}); {origin.mismatch_fix}"
            ) from err
        name, in_file, in_model = mismatches[0]
        raise BadInputError(
            f"{source}: the weights do not fit the model built by {origin.arch}: shapes differ for {_names([m[0] for m in mismatches])} "
            f"(e.g. {name!r}: {list(_dims(in_file))} in the file, {list(_dims(in_model))} in the model); {origin.mismatch_fix}"
        ) from err


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory; pass the model file inside it")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read, a device never end
        raise BadInputError(
            f"{path}: is not a regular file (a pipe, socket or device); pass a model file saved with torch.save"
        )
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{path}: not readable; check its permissions")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: is empty; pass a model saved with torch.save")


def _refuse_foreign_formats(path: Path) -> None:
    """Recognize what torch.load must not be given; BadInputError for each."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise BadInputError(f"{path}: a truncated or corrupted zip-format checkpoint; save or copy it again")
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("/constants.pkl") for name in names):
            raise BadInputError(
                f"{path}: is a TorchScript archive, which onorm cannot convert; save the eager model's state dict "
                "(torch.save(model.state_dict(), ...)) and pass --arch"
            )
        if any(name.endswith("/archive_format") for name in names):
            raise BadInputError(
                f"{path}: is a torch.export program (.pt2), which onorm cannot convert; save the eager model's state dict "
                "(torch.save(model.state_dict(), ...)) and pass --arch"
            )
        if not any(name.endswith("data.pkl") for name in names):
            raise BadInputError(f"{path}: a zip file but not a PyTorch checkpoint; pass a model saved with torch.save")
        return
    if _is_onnx(path, head):
        raise BadInputError(
            f"{path}: is an ONNX model; onorm convert takes a PyTorch model (.pt saved with torch.save)"
        )
    if head[:1] == b"\x80":  # a pickle protocol opcode: the legacy (non-zip) torch.save format
        return
    if _is_text(head):
        raise BadInputError(f"{path}: is a text file, not a model; pass a model saved with torch.save")
    raise BadInputError(f"{path}: not a PyTorch model file (unrecognized content); pass a model saved with torch.save")


def _is_onnx(path: Path, head: bytes) -> bool:
    if (
        path.suffix.lower() != ".onnx" and head[:1] != b"\x08"
    ):  # 0x08: protobuf field 1 (ir_version), how ONNX files start
        return False
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable as ONNX: some other format
        return path.suffix.lower() == ".onnx"
    return model.ir_version > 0


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end of the sample is still text
        return err.start >= len(head) - 3
    return True


def _safe_load(path: Path, trust: bool) -> Any:
    """``torch.load`` with weights_only unless trusted; a pickle that needs more is refused unless ``trust``.

    torch.load reads an open file, never the path: given a path it would pick its reader by
    the name (``*.safetensors`` imports ``safetensors``, from the current directory first),
    and the path could meanwhile become a pipe that blocks the read.
    """
    with _open_regular(path) as handle:
        return _load_handle(handle, path, trust)


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[Any]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInputError(
                f"{quoted(path)}: is not a regular file (a pipe, socket or device); pass a model file saved with torch.save"
            )
        yield handle


def _load_handle(handle: Any, path: Path, trust: bool) -> Any:
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise BadInputError(
                f"{path}: cannot be read ({first_line(err)}); the file is truncated or corrupted"
            ) from err
        if not trust:
            raise BadInputError(
                f"{path}: contains pickled Python objects{_unsafe_globals(path)}; loading them runs code from the file. "
                "If you trust it, pass --trust; otherwise save a state dict (torch.save(model.state_dict(), ...)) and pass --arch"
            ) from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for damaged files
        raise BadInputError(f"{path}: cannot be read ({first_line(err)}); the file is truncated or corrupted") from err
    handle.seek(0)
    try:
        with cwd_importable():  # the user trusts the file: its classes import as `python -m` would find them
            return torch.load(handle, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as err:
        raise BadInputError(
            f"{path}: the pickled model's code cannot be imported ({first_line(err)}); run onorm from the folder with the code "
            "that defines it, or save a state dict and pass --arch"
        ) from err
    except Exception as err:  # noqa: BLE001 - arbitrary unpickling code failed
        raise BadInputError(f"{path}: cannot be unpickled ({type(err).__name__}: {first_line(err)})") from err


def _unsafe_globals(path: Path) -> str:
    """`` (a.B, c.D)``: the classes the pickle would import, found without running it; "" if unknown."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only a hint for the message
        return ""
    return f" ({_names(names)})" if names else ""


def _select(obj: Any, key: str | None, path: Path) -> tuple[Mapping[str, Any] | nn.Module, str | None]:
    """The module or state dict inside a loaded file, and the key it was under (None: the top level)."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            available = (
                _names(list(obj)) if isinstance(obj, Mapping) else f"none (the file holds a {type(obj).__name__})"
            )
            raise BadInputError(f"{path}: --key {key!r} is not in the file; available keys: {available}")
        found = obj[key]
        if not (isinstance(found, nn.Module) or _is_state_dict(found)):
            raise BadInputError(
                f"{path}: --key {key!r} holds a {type(found).__name__}, not a state dict or module; pick another --key"
            )
        return found, key
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for candidate in STATE_DICT_KEYS:
            if candidate in obj and (isinstance(obj[candidate], nn.Module) or _is_state_dict(obj[candidate])):
                return obj[candidate], candidate
        not_tensors = [
            name
            for name, value in obj.items()
            if not isinstance(value, (Tensor, Mapping, nn.Module)) and value is not None
        ]
        if any(isinstance(value, Tensor) for value in obj.values()) and not_tensors:
            raise BadInputError(
                f"{path}: looks like a state dict, but {_names(not_tensors)} {'is not a tensor' if len(not_tensors) == 1 else 'are not tensors'} "
                f"(e.g. a {type(obj[not_tensors[0]]).__name__}); save only model.state_dict(), or pass --key NAME"
            )
        raise BadInputError(
            f"{path}: no state dict found among the keys {_names(list(obj))}; pass --key NAME to pick it"
        )
    raise BadInputError(
        f"{path}: holds a {type(obj).__name__}, not a model or state dict; pass a model saved with torch.save"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(name, str) for name in obj)
        and any(isinstance(value, Tensor) for value in obj.values())
        and all(isinstance(value, Tensor) or value is None for value in obj.values())
    )


def _strip_data_parallel_prefix(module: nn.Module, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    prefix = "module."
    expected = module.state_dict().keys()
    if all(name.startswith(prefix) for name in state_dict) and not all(name.startswith(prefix) for name in expected):
        return {name[len(prefix) :]: value for name, value in state_dict.items()}
    return state_dict


def _warn_defaults_used(path: Path, layers: int) -> None:
    settings = ", ".join(f"{name}={value}" for name, value in asdict(ConvertOptions()).items())
    warnings.warn(
        f"{quoted(path)}: the state dict of a converted model records no conversion options, so its {layers} OnlineNorm layers "
        f"were rebuilt with the defaults ({settings}); to record yours, save with onorm_convert.save_checkpoint(model, path, arch=...)",
        LoadWarning,
        stacklevel=3,
    )


def _rebuild_checkpoint(
    ckpt: dict[str, Any], path: Path, arch: str | None, arch_kwargs: dict | None, trust: bool
) -> LoadedModel:
    """arch(**arch_kwargs) with the recorded OnlineNorm layout and the recorded state dict loaded.

    The recorded arch is imported only with consent (see :func:`_recorded_code_consent`).
    """
    consent = _recorded_code_consent(ckpt, path, arch is not None, arch_kwargs is not None, trust)
    origin = _checkpoint_origin(path, arch is not None, arch_kwargs is not None, bool(ckpt["arch_kwargs"]))
    arch = ckpt["arch"] if arch is None else arch
    kwargs = dict(ckpt["arch_kwargs"]) if arch_kwargs is None else dict(arch_kwargs)
    shapes = [tuple(int(d) for d in shape) for shape in ckpt["input_shapes"]]
    module = build_arch(arch, kwargs, origin)
    layout = ckpt.get("layers") or inferred_layout(
        module, ckpt["state_dict"], recorded_options(ckpt["conversion"], path), path
    )
    module = restore_layout(module, layout, path)
    load_state_dict_checked(module, ckpt["state_dict"], path, origin)
    info = {"tool_version": ckpt.get("tool_version"), "conversion": dict(ckpt["conversion"]), "code_consent": consent}
    return LoadedModel(module, ONORM_CHECKPOINT, arch, kwargs, shapes, info)


def _recorded_code_consent(
    ckpt: Mapping[str, Any], path: Path, arch_given: bool, kwargs_given: bool, trust: bool
) -> str:
    """How the user consented to the code the checkpoint names: "signature", "--arch" or "--trust"; else BadInputError.

    Checked before anything is imported: importing a module the file names already runs
    code chosen by the file. ``--arch`` names the code, but the keyword arguments it is
    called with are the file's unless ``--arch-kwargs`` is given, and some factories load
    files or code that their arguments name: so those need consent too.
    """
    signed, why_not = signed_by_this_user(
        ckpt["arch"], ckpt["arch_kwargs"], ckpt.get("arch_location"), ckpt.get("signature")
    )
    if signed:
        return "signature"
    if trust:
        return "--trust"
    if arch_given and (kwargs_given or not ckpt["arch_kwargs"]):
        return "--arch"
    if arch_given:
        raise BadInputError(
            f"{quoted(path)}: your onorm did not write this checkpoint ({why_not}), and it records the arguments "
            f"{_shown(ckpt['arch_kwargs'])} for the model code; pass the ones you mean with --arch-kwargs, or --trust to use these"
        )
    recorded = ckpt["arch"]
    raise BadInputError(
        f"{quoted(path)}: this onorm checkpoint names its model code {recorded!r}, but your onorm did not write it ({why_not}), "
        f"and importing that code would run it; if you know that code, pass --arch {recorded!r}"
        + (" and --arch-kwargs" if ckpt["arch_kwargs"] else "")
        + "; to run what the file names as it is, pass --trust"
    )


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checkpoint_origin(path: Path, arch_given: bool, kwargs_given: bool, kwargs_recorded: bool) -> CodeOrigin:
    """Who named a checkpoint's code and kwargs: the user's flags where given, else the file's fields."""
    kwargs = "--arch-kwargs" if kwargs_given else ("the checkpoint's arch_kwargs" if kwargs_recorded else None)
    if arch_given:
        return CodeOrigin(kwargs=kwargs)
    return CodeOrigin(
        f"{quoted(path)}: the checkpoint's arch",
        kwargs,
        "the file is damaged or its model code changed since; convert the model again or pass --arch",
    )


def _names(names: list[str] | tuple[str, ...]) -> str:
    """``'a', 'b', 'c' and 4 more``: a short list for one-line messages."""
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d.strip())
