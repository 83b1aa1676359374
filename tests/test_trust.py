"""No code chosen by a file runs without the user's consent (docs/contract.md, "Code a file names").

An onorm checkpoint names the code that builds its model. Every command rebuilds it from
that name only when this user's onorm signed it (onorm_convert.trust); any other needs
--arch or --trust, and is refused before anything is imported.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from onorm_convert import trust
from onorm_convert.checkpoint import UnsignedCheckpointWarning, make_checkpoint, write_checkpoint
from onorm_convert.convert import convert
from onorm_convert.errors import BadInputError
from onorm_convert.load import ONORM_CHECKPOINT, read_model

from conftest import MLP, MLP_ARCH, REPO, onorm

pytestmark = pytest.mark.usefixtures("in_repo")

COMMANDS = ("inspect", "export", "convert")
_names = itertools.count()


@pytest.fixture
def own_key(tmp_path, monkeypatch):
    """A fresh key folder for this test: what it signs, only it trusts."""
    folder = tmp_path / "config"
    monkeypatch.setenv("ONORM_CONFIG_DIR", str(folder))
    return folder


def converted_mlp() -> torch.nn.Module:
    from sample_models import models

    model = models.digits_mlp()
    model.load_state_dict(torch.load(MLP, weights_only=True))
    return convert(model)


def crafted_checkpoint(path: Path, arch: str, arch_kwargs: dict, **fields) -> Path:
    """An onorm checkpoint as an attacker writes it: valid fields, its own arch, no (or a forged) signature."""
    checkpoint = make_checkpoint(
        converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"}, input_shapes=[(2, 64)]
    )
    checkpoint.update(arch=arch, arch_kwargs=arch_kwargs, signature=None, **fields)
    torch.save(checkpoint, path)
    return path


def planted_module(folder: Path, marker: Path) -> str:
    """A module that touches ``marker`` when imported (and its factory does too): code a file could name."""
    name = f"planted_{next(_names)}_{os.getpid()}"
    (folder / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\ndef factory(**kwargs):\n    Path({str(marker)!r}).touch()\n"
    )
    return name


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("command", COMMANDS)
def test_a_crafted_checkpoint_runs_no_factory_without_consent(tmp_path, command):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.pt", "subprocess:run", {"args": ["touch", str(marker)]})
    result = onorm(command, path, "--json", *(["-o", tmp_path / "out.onnx"] if command == "export" else []))
    assert result.exit_code == 2 and not marker.exists()
    report = json.loads(result.stdout)
    assert report["error"]["type"] == "BadInputError"
    message = report["error"]["message"]
    assert (
        "names its model code 'subprocess:run'" in message
        and "your onorm did not write it (it carries no signature)" in message
    )
    assert "pass --arch 'subprocess:run'" in message and "pass --trust" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_crafted_checkpoint_imports_no_module_without_consent(tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the planted module is importable, as from a user's working folder
    marker = tmp_path / "imported"
    name = planted_module(tmp_path, marker)
    path = crafted_checkpoint(tmp_path / "evil.pt", f"{name}:factory", {})
    result = onorm(command, path)
    assert result.exit_code == 2 and not marker.exists() and name not in sys.modules
    assert f"names its model code '{name}:factory'" in result.stderr


def test_a_signature_made_with_another_key_is_not_trusted(tmp_path, own_key, monkeypatch):
    monkeypatch.setenv("ONORM_CONFIG_DIR", str(tmp_path / "someone-else"))
    checkpoint = make_checkpoint(converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"})
    torch.save(checkpoint, tmp_path / "theirs.pt")
    monkeypatch.setenv("ONORM_CONFIG_DIR", str(own_key))
    with pytest.raises(BadInputError, match="your onorm did not write it \\(you have no signing key yet"):
        read_model(tmp_path / "theirs.pt")
    write_checkpoint(
        tmp_path / "mine.pt",
        make_checkpoint(converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"}),
    )
    with pytest.raises(BadInputError, match="its signature does not match your key"):
        read_model(tmp_path / "theirs.pt")
    assert read_model(tmp_path / "mine.pt").info["code_consent"] == "signature"


@pytest.mark.parametrize("field, value", [("arch", "os:system"), ("arch_kwargs", {"command": "touch x"})])
def test_a_signed_checkpoint_whose_code_fields_were_changed_is_not_trusted(tmp_path, own_key, field, value):
    checkpoint = make_checkpoint(converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"})
    assert read_model_of(tmp_path / "ok.pt", checkpoint).info["code_consent"] == "signature"
    checkpoint[field] = value
    with pytest.raises(BadInputError, match="its signature does not match your key"):
        read_model_of(tmp_path / "tampered.pt", checkpoint)


def read_model_of(path: Path, checkpoint: dict, **kwargs):
    torch.save(checkpoint, path)
    return read_model(path, **kwargs)


def test_arch_or_trust_is_consent(tmp_path):
    path = crafted_checkpoint(tmp_path / "unsigned.pt", MLP_ARCH, {})
    with pytest.raises(BadInputError, match="pass --arch 'sample_models.models:digits_mlp'"):
        read_model(path)
    assert read_model(path, arch=MLP_ARCH).info["code_consent"] == "--arch"
    loaded = read_model(path, trust=True)
    assert (loaded.format, loaded.arch, loaded.info["code_consent"]) == (ONORM_CHECKPOINT, MLP_ARCH, "--trust")
    assert onorm("inspect", path, "--trust").exit_code == 0


def test_convert_signs_what_it_writes_and_export_takes_it_without_flags(tmp_path, own_key):
    out = tmp_path / "mlp_onorm.pt"
    assert onorm("convert", MLP, "--arch", MLP_ARCH, "-o", out).exit_code == 0
    assert isinstance(torch.load(out, weights_only=True)["signature"], str)
    assert stat.S_IMODE((own_key / trust.KEY_NAME).stat().st_mode) == 0o600
    result = onorm("export", out, "--input-shape", "2,64", "-o", tmp_path / "mlp.onnx")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("unsafe", ["readable by others", "symbolic link"])
def test_an_unsafe_key_signs_nothing_and_trusts_nothing(tmp_path, own_key, unsafe):
    write_checkpoint(
        tmp_path / "signed.pt",
        make_checkpoint(converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"}),
    )
    key = own_key / trust.KEY_NAME
    if unsafe == "readable by others":
        key.chmod(0o644)
    else:
        key.rename(own_key / "elsewhere")
        key.symlink_to(own_key / "elsewhere")
    with pytest.raises(BadInputError, match="signing key .* (is not a private file of yours|cannot be read)"):
        read_model(tmp_path / "signed.pt")
    with pytest.warns(
        UnsignedCheckpointWarning,
        match="the checkpoint is not signed .* will need --arch sample_models.models:digits_mlp or --trust",
    ):
        checkpoint = make_checkpoint(converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"})
    assert checkpoint["signature"] is None


def test_the_key_is_made_once_and_kept(own_key):
    location = trust.code_location(MLP_ARCH)
    assert location == str(REPO / "sample_models" / "__init__.py")
    first = trust.sign(MLP_ARCH, {"width": 3}, location)
    assert trust.sign(MLP_ARCH, {"width": 3}, location) == first != trust.sign(MLP_ARCH, {"width": 4}, location)
    assert trust.signed_by_this_user(MLP_ARCH, {"width": 3}, location, first) == (True, "")
    assert [p.name for p in own_key.iterdir()] == [trust.KEY_NAME]  # no partial key left beside it


@pytest.mark.parametrize("arch", ["os:system; rm -rf ~", "a" * 300 + ":f", "x:y\nz", ":f"])
def test_a_recorded_arch_that_is_not_a_code_name_is_damage(tmp_path, arch):
    path = crafted_checkpoint(tmp_path / "c.pt", arch, {})
    with pytest.raises(BadInputError, match="field 'arch' is missing or malformed"):
        read_model(path, trust=True)


def test_messages_about_recorded_fields_name_the_file_not_flags(tmp_path):
    path = crafted_checkpoint(tmp_path / "c.pt", MLP_ARCH, {}, conversion={"ecm": "clamp", "clamp_value": -1.0})
    result = onorm("inspect", path, "--trust")
    assert result.exit_code == 2
    assert (
        "c.pt: onorm checkpoint field 'conversion' is malformed: it holds clamp_value=-1.0, which must be positive"
        in result.stderr
    )
    assert "--clamp-value" not in result.stderr
    path = crafted_checkpoint(tmp_path / "k.pt", MLP_ARCH, {"width": 3})
    result = onorm("inspect", path, "--trust")
    assert (
        result.exit_code == 2
        and "the checkpoint's arch 'sample_models.models:digits_mlp': calling it with the checkpoint's arch_kwargs"
        in result.stderr
    )
    assert (
        "pass --arch-kwargs to replace the checkpoint's arch_kwargs" in result.stderr
        and "fix --arch-kwargs" not in result.stderr
    )


def test_an_empty_arch_is_no_consent(tmp_path):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.pt", "subprocess:run", {"args": ["touch", str(marker)]})
    result = onorm("inspect", path, "--arch", "")
    assert result.exit_code == 2 and not marker.exists() and "--arch '': empty" in result.stderr


def test_a_file_named_safetensors_imports_nothing_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "safetensors").mkdir()
    (tmp_path / "safetensors" / "__init__.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (tmp_path / "safetensors" / "torch.py").write_text("def load_file(*a, **k):\n    return {}\n")
    torch.save(converted_mlp().state_dict(), tmp_path / "model.safetensors")
    result = onorm("inspect", tmp_path / "model.safetensors", "--arch", MLP_ARCH)
    assert not marker.exists()
    assert result.exit_code == 0, result.output  # read as the torch.save file it is


def test_arch_alone_does_not_accept_the_files_keyword_arguments(tmp_path):
    path = crafted_checkpoint(tmp_path / "unsigned.pt", MLP_ARCH, {"checkpoint_path": "/somewhere/else.pt"})
    result = onorm("inspect", path, "--arch", MLP_ARCH)
    assert result.exit_code == 2
    assert "records the arguments {'checkpoint_path': '/somewhere/else.pt'} for the model code" in result.stderr
    assert "pass the ones you mean with --arch-kwargs, or --trust" in result.stderr
    assert onorm("inspect", path, "--arch", MLP_ARCH, "--arch-kwargs", "{}").exit_code == 0


def test_a_signed_checkpoint_beside_a_look_alike_module_is_not_trusted(tmp_path, own_key, monkeypatch):
    home, elsewhere = tmp_path / "project", tmp_path / "downloads"
    home.mkdir()
    elsewhere.mkdir()
    marker = tmp_path / "ran"
    name = planted_module(home, tmp_path / "benign")
    (elsewhere / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    )  # same name, other code
    monkeypatch.chdir(home)
    checkpoint = make_checkpoint(converted_mlp(), arch=f"{name}:factory", arch_kwargs={}, conversion={})
    assert checkpoint["arch_location"] == str(home / f"{name}.py") and name not in sys.modules
    torch.save(checkpoint, elsewhere / "mine.pt")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(
        BadInputError, match=f"its code would now be imported from '{elsewhere / name}.py', not from '{home / name}.py'"
    ):
        read_model(elsewhere / "mine.pt")
    assert not marker.exists() and name not in sys.modules


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tool_version", [[[]]], "field 'tool_version' is malformed"),
        ("signature", "é" * 64, "field 'signature' is malformed"),
        ("arch", "tοrchvision.models:resnet18", "field 'arch' is missing or malformed"),  # a Greek omicron
        ("arch_kwargs", {"a": nested(40)}, "field 'arch_kwargs' is missing or malformed"),
        ("conversion", {"clamp_value": 10**400}, "it holds clamp_value=.*, which must be a finite number"),
        ("conversion", {"include": torch.zeros(2)}, "field 'conversion' is missing or malformed"),
        ("conversion", {"frozen_bn": "yes"}, "field 'conversion' is missing or malformed"),
        ("input_shapes", [[True, 64]], "field 'input_shapes' is missing or malformed"),
    ],
)
def test_hostile_field_values_are_damage_not_a_crash(tmp_path, field, value, message):
    checkpoint = make_checkpoint(converted_mlp(), arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"})
    checkpoint[field] = value
    torch.save(checkpoint, tmp_path / "c.pt")
    result = onorm("inspect", tmp_path / "c.pt", "--json")
    assert result.exit_code == 2, result.output
    assert json.loads(result.stdout)["exit_code"] == 2
    assert re_search(message, result.stderr)


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_keyword_arguments_without_one_json_text_are_not_signed(own_key):
    with pytest.raises(trust.KeyUnavailable, match="no canonical JSON form"):
        trust.sign(MLP_ARCH, {"sizes": (1, 2)}, None)  # a tuple would verify as the list [1, 2]
    with pytest.raises(trust.KeyUnavailable, match="no canonical JSON form"):
        trust.sign(MLP_ARCH, {1: "x"}, None)  # an int key would verify as "1"
