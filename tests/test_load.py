"""read_model/load_model: every accepted format loads, every bad input is refused with one clear line."""

from __future__ import annotations

import itertools
import os
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from onorm_convert import OnlineNorm1d, load_model
from onorm_convert.checkpoint import FORMAT_VERSION, make_checkpoint, write_checkpoint
from onorm_convert.cli.options import parse_arch_kwargs
from onorm_convert.convert import convert
from onorm_convert.errors import BadInputError
from onorm_convert.load import ONORM_CHECKPOINT, PICKLED_MODULE, STATE_DICT, build_arch, read_model

_counter = itertools.count()

ARCH_SOURCE = """
from torch import nn

class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x):
        return self.bn(self.fc(x))

def net(width=4):
    return Net(width)

def broken(width=4):
    raise RuntimeError("no GPU here")

def not_a_model():
    return 42

NUMBER = 3
"""


@pytest.fixture
def arch(tmp_path, monkeypatch):
    """A fresh importable module in the (temporary) current directory; yields its name."""
    name = f"user_arch_{next(_counter)}_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(ARCH_SOURCE))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def trained(module_name: str, width: int = 4) -> nn.Module:
    model = build_arch(f"{module_name}:net", {"width": width})  # imports it from the current directory
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


def test_state_dict_with_arch(tmp_path, arch):
    model = trained(arch)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = read_model(tmp_path / "sd.pt", arch=f"{arch}:net")
    assert (loaded.format, loaded.arch, loaded.arch_kwargs, loaded.input_shapes) == (STATE_DICT, f"{arch}:net", {}, [])
    x = torch.randn(2, 3)
    torch.testing.assert_close(loaded.module.eval()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_training_checkpoint_keys_are_found(tmp_path, arch, key):
    model = trained(arch, width=5)
    torch.save({key: model.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    loaded = read_model(tmp_path / "ckpt.pt", arch=f"{arch}:net", arch_kwargs={"width": 5})
    assert loaded.info["key"] == key and torch.equal(loaded.module.bn.running_var, model.bn.running_var)


def test_explicit_key_and_data_parallel_prefix(tmp_path, arch):
    model = trained(arch)
    prefixed = {f"module.{name}": value for name, value in model.state_dict().items()}
    torch.save({"ema": prefixed, "raw": model.state_dict()}, tmp_path / "ckpt.pt")
    loaded = read_model(tmp_path / "ckpt.pt", arch=f"{arch}:net", key="ema")
    assert torch.equal(loaded.module.bn.running_mean, model.bn.running_mean)


def test_absent_key_lists_the_keys(tmp_path, arch):
    torch.save({"raw": trained(arch).state_dict(), "epoch": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(BadInputError, match=r"--key 'ema' is not in the file; available keys: 'raw', 'epoch'"):
        read_model(tmp_path / "ckpt.pt", arch=f"{arch}:net", key="ema")


def test_state_dict_without_arch_says_what_to_pass(tmp_path, arch):
    torch.save(trained(arch).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(BadInputError, match="holds a state dict .* pass --arch package.module:factory"):
        read_model(tmp_path / "sd.pt")


def test_missing_and_unexpected_keys_are_named(tmp_path, arch):
    state = trained(arch).state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(BadInputError, match=r"missing 'fc.weight'; unexpected 'extra.weight'"):
        read_model(tmp_path / "sd.pt", arch=f"{arch}:net")


def test_shape_mismatch_names_the_tensors(tmp_path, arch):
    torch.save(trained(arch, width=4).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(
        BadInputError, match=r"shapes differ for 'fc.weight', .* \[4, 3\] in the file, \[6, 3\] in the model"
    ):
        read_model(tmp_path / "sd.pt", arch=f"{arch}:net", arch_kwargs={"width": 6})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:net", "cannot import 'no_such_module_xyz'"),
        ("{arch}:missing", "has no attribute 'missing'"),
        ("{arch}:NUMBER", "'NUMBER' is a int, not callable"),
        ("{arch}", "expected package.module:factory"),
        ("{arch}:broken", r"calling it without arguments failed \(RuntimeError: no GPU here\)"),
        ("{arch}:not_a_model", "returned a int, not a torch.nn.Module"),
    ],
)
def test_bad_arch(tmp_path, arch, spec, message):
    torch.save(trained(arch).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(BadInputError, match=message):
        read_model(tmp_path / "sd.pt", arch=spec.format(arch=arch))


def test_pickled_module_needs_trust_and_names_both_ways(tmp_path, arch):
    model = trained(arch)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(
        BadInputError, match=rf"pickled Python objects \(.*'{arch}.Net'.*pass --trust; otherwise .*--arch"
    ):
        read_model(tmp_path / "whole.pt")
    loaded = read_model(tmp_path / "whole.pt", trust=True)
    assert loaded.format == PICKLED_MODULE and torch.equal(loaded.module.fc.weight, model.fc.weight)


def test_pickled_module_whose_class_is_gone(tmp_path, arch):
    torch.save(trained(arch), tmp_path / "whole.pt")
    (tmp_path / f"{arch}.py").unlink()
    sys.modules.pop(arch)
    with pytest.raises(BadInputError, match="the pickled model's code cannot be imported"):
        read_model(tmp_path / "whole.pt", trust=True)


class Malicious:
    """Unpickling this calls ``open(path, "w")``: it would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"state_dict": Malicious(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(BadInputError, match=r"pickled Python objects \('io.open'\)"):
        read_model(tmp_path / "evil.pt", arch="x:y")
    assert not marker.exists()


def test_onorm_checkpoint_rebuilds_without_flags(tmp_path, arch):
    model = trained(arch, width=5)
    options = {
        "ecm": "none",
        "clamp_value": 5.0,
        "alpha_fwd": 0.9,
        "alpha_bkw": 0.99,
        "include": [],
        "exclude": [],
        "frozen_bn": False,
    }
    converted = convert(model, **options)
    write_checkpoint(
        tmp_path / "c.pt",
        make_checkpoint(
            converted, arch=f"{arch}:net", arch_kwargs={"width": 5}, conversion=options, input_shapes=[(2, 3)]
        ),
    )
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION and raw["conversion"] == options
    loaded = read_model(tmp_path / "c.pt")
    assert (loaded.format, loaded.arch_kwargs, loaded.input_shapes) == (ONORM_CHECKPOINT, {"width": 5}, [(2, 3)])
    assert isinstance(loaded.module.bn, OnlineNorm1d) and loaded.module.bn.alpha_fwd == 0.9
    x = torch.randn(4, 3)
    torch.testing.assert_close(load_model(tmp_path / "c.pt").eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_checkpoint_from_a_newer_onorm_is_refused(tmp_path, arch):
    checkpoint = make_checkpoint(trained(arch), arch=f"{arch}:net", arch_kwargs={}, conversion={})
    checkpoint["format_version"] = FORMAT_VERSION + 1
    torch.save(checkpoint, tmp_path / "c.pt")
    with pytest.raises(BadInputError, match=f"format version {FORMAT_VERSION + 1} is not supported .* upgrade onorm"):
        read_model(tmp_path / "c.pt")


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2))


def write_bad_input(kind: str, folder) -> os.PathLike:
    """A file (or folder) of the given bad kind; shared with the CLI tests."""
    path = folder / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(
            torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            .numpy()
            .tobytes()
        )
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "truncated_zip":
        torch.save(tiny().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "onnx":
        path = folder / "model.onnx"
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        onnx.save(helper.make_model(graph), path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(tiny()), path)
    elif kind == "export_program":
        path = folder / "program.pt2"
        torch.export.save(torch.export.export(tiny(), (torch.randn(1, 2),)), path)
    elif kind == "not_a_model":
        torch.save([1, 2, 3], path)
    return path


BAD_INPUTS = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "is empty",
    "random_bytes": "not a PyTorch model file",
    "text": "is a text file",
    "truncated_zip": "truncated or corrupted zip-format checkpoint",
    "onnx": "is an ONNX model",
    "torchscript": "is a TorchScript archive",
    "export_program": r"is a torch.export program",
    "not_a_model": "holds a list, not a model or state dict",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_files_are_refused(tmp_path, kind):
    path = write_bad_input(kind, tmp_path)
    with pytest.raises(BadInputError, match=BAD_INPUTS[kind]) as caught:
        read_model(path, arch="x:y", trust=True)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{bad", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ],
)
def test_bad_arch_kwargs(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_arch_kwargs(text)
    assert parse_arch_kwargs('{"num_classes": 10}') == {"num_classes": 10}


@pytest.mark.parametrize(
    "field, value",
    [
        ("conversion", {"ecm": "clamp", "bogus": 1}),
        ("conversion", {"alpha_fwd": "fast"}),
        ("input_shapes", [["1", "3"]]),
        ("input_shapes", [[0, 3]]),
        ("layers", {"bn": {"rank": 7, "config": {}}}),
        ("layers", {"bn": {"rank": 1, "config": {"bogus": 1}}}),
        ("layers", [1]),
    ],
)
def test_damaged_checkpoint_fields_are_bad_input(tmp_path, arch, field, value):
    converted = convert(trained(arch, width=5))
    ckpt = make_checkpoint(
        converted, arch=f"{arch}:net", arch_kwargs={"width": 5}, conversion={"ecm": "clamp"}, input_shapes=[(2, 3)]
    )
    ckpt[field] = value
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(BadInputError, match=f"field '{field}' is missing or malformed|field '{field}' is malformed"):
        read_model(tmp_path / "c.pt")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        path = Path("/dev/zero")  # reading it would never end
    with pytest.raises(BadInputError, match="is not a regular file \\(a pipe, socket or device\\)"):
        read_model(path, arch="x:y")


def test_a_state_dict_with_a_value_that_is_not_a_tensor_is_named(tmp_path, arch):
    state = dict(trained(arch).state_dict(), epoch=3)
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(BadInputError, match="looks like a state dict, but 'epoch' is not a tensor \\(e.g. a int\\)"):
        read_model(tmp_path / "sd.pt", arch=f"{arch}:net")


def test_a_factory_called_without_kwargs_does_not_say_fix_arch_kwargs(tmp_path, arch):
    torch.save(trained(arch).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(
        BadInputError, match="calling it without arguments failed .*; pass --arch-kwargs if it needs arguments$"
    ):
        read_model(tmp_path / "sd.pt", arch=f"{arch}:broken")


def test_complex_weights_in_a_state_dict_are_refused_not_cut_to_their_real_part(tmp_path, arch):
    state = trained(arch).state_dict()
    name = next(iter(state))
    state[name] = state[name].to(torch.complex64)
    torch.save(state, tmp_path / "sd.pt")
    with pytest.raises(BadInputError, match=f"'{name}' holds complex numbers"):
        read_model(tmp_path / "sd.pt", arch=f"{arch}:net")


def test_a_version_1_checkpoint_gets_its_layout_from_its_state_dict(tmp_path, arch):
    model = trained(arch, width=5)
    converted = convert(model, alpha_fwd=0.9, ecm="none")
    ckpt = make_checkpoint(
        converted, arch=f"{arch}:net", arch_kwargs={"width": 5}, conversion={"alpha_fwd": 0.9, "ecm": "none"}
    )
    del ckpt["layers"]
    ckpt["format_version"] = 1
    torch.save(ckpt, tmp_path / "v1.pt")
    loaded = read_model(tmp_path / "v1.pt").module
    assert isinstance(loaded.bn, OnlineNorm1d) and (loaded.bn.alpha_fwd, loaded.bn.ecm) == (0.9, "none")
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_recorded_layer_where_the_model_has_no_norm_names_the_wrong_arch(tmp_path, arch):
    ckpt = make_checkpoint(convert(trained(arch, width=5)), arch=f"{arch}:net", arch_kwargs={"width": 5}, conversion={})
    ckpt["layers"] = {"fc": ckpt["layers"]["bn"]}
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(
        BadInputError,
        match="records an OnlineNorm at 'fc', where the model has a Linear; .* pass the --arch it was converted from",
    ):
        read_model(tmp_path / "c.pt")
