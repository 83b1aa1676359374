"""`onorm convert` and `onorm inspect` end to end: every input format, every bad input, the exit-code contract."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onorm_convert import OnlineNorm2d, OnlineNormBase, load_model
from onorm_convert.checkpoint import FORMAT_TAG

from conftest import REPO, SAMPLES, onorm
from test_load import BAD_INPUTS, Malicious, write_bad_input

pytestmark = pytest.mark.usefixtures("in_repo")

sys.path.insert(0, str(REPO))  # sample_models lives at the repository root, outside the installed package
from sample_models import models  # noqa: E402


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_model(name: str) -> torch.nn.Module:
    model = getattr(models, name)()
    model.load_state_dict(torch.load(SAMPLES / f"{name}.pt", weights_only=True))
    return model.eval()


def shape_arg(name: str, batch: int = 3) -> str:
    return ",".join(map(str, (batch,) + models.INPUT_SHAPES[name][1:]))


@pytest.mark.parametrize("name", sorted(models.INPUT_SHAPES))
def test_state_dict_with_arch_gives_a_self_describing_checkpoint(tmp_path, name):
    out = tmp_path / "out.pt"
    result = onorm(
        "convert",
        SAMPLES / f"{name}.pt",
        "--arch",
        f"sample_models.models:{name}",
        "--ecm",
        "none",
        "--input-shape",
        shape_arg(name),
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["check"]["exact"] and report["output_format"] == "onorm_checkpoint"
    assert report["converted"] == sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in sample_model(name).modules()
    )
    raw = torch.load(out, weights_only=True)
    assert (
        raw["format"] == FORMAT_TAG
        and raw["arch"] == f"sample_models.models:{name}"
        and raw["input_shapes"] == [[3, *models.INPUT_SHAPES[name][1:]]]
    )
    rebuilt = load_model(out).eval()  # no --arch: the checkpoint says how
    x = torch.rand((4,) + models.INPUT_SHAPES[name][1:])
    torch.testing.assert_close(rebuilt(x), sample_model(name)(x), rtol=1e-5, atol=1e-5)


def test_table_summary_and_default_output_beside_the_input(tmp_path):
    source = tmp_path / "resnet.pt"
    shutil.copy(SAMPLES / "digits_resnet.pt", source)
    result = onorm("convert", source, "--arch", "sample_models.models:digits_resnet", "--input-shape", "2,1,8,8")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["module", "old", "type", "new", "type", "channels", "statistics", "source"]
    assert lines[2].split() == ["3.bn1", "BatchNorm2d", "OnlineNorm2d", "8", "running_mean/running_var"]
    assert "ECM off: relative" in result.stdout and "(exact)" in result.stdout
    assert f"converted 5 of 5 normalization layers -> {tmp_path / 'resnet_onorm.pt'}" in result.stdout
    assert isinstance(load_model(tmp_path / "resnet_onorm.pt")[1], OnlineNorm2d)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    args = ["convert", SAMPLES / "digits_mlp.pt", "--arch", "sample_models.models:digits_mlp", "-o", out]
    refused = onorm(*args)
    assert refused.exit_code == 2 and "pass --force" in refused.stderr and out.read_bytes() == b"keep me"
    assert onorm(*args, "--force").exit_code == 0 and torch.load(out, weights_only=True)["format"] == FORMAT_TAG


def test_pickled_module_in_pickled_module_out(tmp_path):
    source = tmp_path / "whole.pt"
    torch.save(sample_model("digits_conv1d"), source)
    result = onorm(
        "convert",
        source,
        "--trust",
        "--input-shape",
        shape_arg("digits_conv1d"),
        "--ecm",
        "layer-scaling",
        "-o",
        tmp_path / "out.pt",
    )
    assert result.exit_code == 0, result.output
    converted = torch.load(tmp_path / "out.pt", weights_only=False)
    norms = [m for m in converted.modules() if isinstance(m, OnlineNormBase)]
    assert len(norms) == 2 and all(m.ecm == "layer_scaling" for m in norms)


def test_onorm_checkpoint_converts_to_itself_and_inspects(tmp_path):
    first = tmp_path / "first.pt"
    assert (
        onorm(
            "convert",
            SAMPLES / "volume_net.pt",
            "--arch",
            "sample_models.models:volume_net",
            "-o",
            first,
            "--input-shape",
            "1,1,4,8,8",
        ).exit_code
        == 0
    )
    again = onorm("convert", first, "-o", tmp_path / "second.pt", "--json")
    assert again.exit_code == 0 and "no BatchNorm layer to convert" in again.stderr
    assert json.loads(again.stdout)["check"]["exact"]  # input shapes recorded in the checkpoint drive the check
    inspected = onorm("inspect", tmp_path / "second.pt", "--json")
    assert inspected.exit_code == 0, inspected.output
    layers = json.loads(inspected.stdout)["layers"]
    assert [(layer["old_type"], layer["export"]) for layer in layers] == [("OnlineNorm3d", "fold into '0'")]
    assert [(layer["export_step"]["action"], layer["export_step"]["into"]) for layer in layers] == [("folded", "0")]


def test_inspect_lists_what_convert_would_change():
    result = onorm("inspect", SAMPLES / "digits_mlp.pt", "--arch", "sample_models.models:digits_mlp")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2].split() == [
        "1",
        "BatchNorm1d",
        "32",
        "->",
        "OnlineNorm1d",
        "fold",
        "into",
        "'0'",
    ]


CHECK_FAILS = """
from torch import nn


class TypeSensitive(nn.Module):
    # Its forward depends on the BatchNorm's type: converting changes what it computes.
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return y if isinstance(self.bn, nn.BatchNorm1d) else 2 * y
"""


def test_check_failure_exits_1_and_writes_nothing(tmp_path, monkeypatch):
    (tmp_path / "type_sensitive.py").write_text(CHECK_FAILS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "type_sensitive", raising=False)
    sys.path_importer_cache.clear()
    from onorm_convert.load import build_arch

    torch.save(build_arch("type_sensitive:TypeSensitive", {}).state_dict(), tmp_path / "sd.pt")
    result = onorm("convert", "sd.pt", "--arch", "type_sensitive:TypeSensitive", "--input-shape", "2,3", "-o", "out.pt")
    assert result.exit_code == 1 and "NOT exact" in result.stdout and "nothing written" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def assert_refused(result, folder: Path, before: dict[str, str], message: str) -> None:
    """Exit 2, one stderr line naming the problem, no traceback, nothing new written, inputs unchanged."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onorm convert: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert {p.name: digest(p) for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_files(tmp_path, kind):
    path = write_bad_input(kind, tmp_path)
    before = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    result = onorm("convert", path, "--arch", "sample_models.models:digits_mlp", "--trust", "-o", tmp_path / "out.pt")
    assert_refused(result, tmp_path, before, BAD_INPUTS[kind].replace("\\", "").split(".")[0])


def state_dict_file(tmp_path: Path) -> Path:
    shutil.copy(SAMPLES / "digits_mlp.pt", tmp_path / "mlp.pt")
    return tmp_path / "mlp.pt"


BAD_FLAGS = {
    "no_arch": ([], "holds a state dict"),
    "arch_not_importable": (["--arch", "nowhere.models:net"], "cannot import 'nowhere.models'"),
    "arch_not_callable": (["--arch", "sample_models.models:INPUT_SHAPES"], "not callable"),
    "arch_keys_mismatch": (
        ["--arch", "sample_models.models:digits_resnet"],
        "do not match the model built by --arch: missing '3.conv1.weight'",
    ),
    "arch_kwargs_json": (
        ["--arch", "sample_models.models:digits_mlp", "--arch-kwargs", "{hidden: 3}"],
        "not valid JSON",
    ),
    "arch_kwargs_shape": (
        ["--arch", "sample_models.models:digits_mlp", "--arch-kwargs", '{"hidden": 3}'],
        "shapes differ",
    ),
    "key_absent": (["--arch", "sample_models.models:digits_mlp", "--key", "ema"], "--key 'ema' is not in the file"),
    "shape_x": (
        ["--arch", "sample_models.models:digits_mlp", "--input-shape", "3x224"],
        "expected comma-separated positive integers",
    ),
    "shape_zero": (
        ["--arch", "sample_models.models:digits_mlp", "--input-shape", "0,3,4,4"],
        "dimensions must be positive",
    ),
    "shape_negative": (
        ["--arch", "sample_models.models:digits_mlp", "--input-shape", "-1,3"],
        "expected comma-separated positive integers",
    ),
    "shape_rejected": (["--arch", "sample_models.models:digits_mlp", "--input-shape", "2,1,8,8"], "layer '0' failed"),
    "ecm": (
        ["--arch", "sample_models.models:digits_mlp", "--ecm", "tanh"],
        "--ecm 'tanh': expected clamp, layer-scaling or none",
    ),
    "alpha": (
        ["--arch", "sample_models.models:digits_mlp", "--alpha-fwd", "1.5"],
        "--alpha-fwd 1.5: must be in [0, 1)",
    ),
    "alpha_mode": (
        ["--arch", "sample_models.models:digits_mlp", "--alpha-mode", "auto"],
        "--alpha-mode 'auto': must be one of fixed, adaptive",
    ),
    "projection": (
        ["--arch", "sample_models.models:digits_mlp", "--projection", "sample"],
        "--projection 'sample': must be one of none, batch",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags(tmp_path, case):
    source = state_dict_file(tmp_path)
    flags, message = BAD_FLAGS[case]
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    assert_refused(onorm("convert", source, *flags, "-o", tmp_path / "out.pt"), tmp_path, before, message)


@pytest.mark.parametrize(
    ("case", "message"), [("missing_folder", "does not exist"), ("is_input", "may not be the input")]
)
def test_bad_outputs(tmp_path, case, message):
    source = state_dict_file(tmp_path)
    output = tmp_path / "nowhere" / "out.pt" if case == "missing_folder" else source
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    assert_refused(
        onorm("convert", source, "--arch", "sample_models.models:digits_mlp", "-o", output), tmp_path, before, message
    )


def test_pickled_module_without_trust_and_a_malicious_pickle(tmp_path):
    torch.save(sample_model("digits_mlp"), tmp_path / "whole.pt")
    marker = tmp_path / "pwned.txt"
    torch.save(Malicious(str(marker)), tmp_path / "evil.pt")
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    assert_refused(
        onorm("convert", tmp_path / "whole.pt", "-o", tmp_path / "out.pt"), tmp_path, before, "pass --trust; otherwise"
    )
    assert_refused(onorm("convert", tmp_path / "evil.pt", "-o", tmp_path / "out.pt"), tmp_path, before, "('io.open')")
    assert not marker.exists()


def run_onorm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onorm_convert", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.mark.slow
def test_real_process_exit_codes(tmp_path):
    ok = run_onorm(
        "convert",
        SAMPLES / "digits_mlp.pt",
        "--arch",
        "sample_models.models:digits_mlp",
        "--input-shape",
        "2,64",
        "-o",
        tmp_path / "out.pt",
    )
    assert ok.returncode == 0, ok.stderr
    torch.save(sample_model("digits_mlp"), tmp_path / "whole.pt")
    refused = run_onorm("convert", tmp_path / "whole.pt", "-o", tmp_path / "refused.pt", "--json")
    assert (
        refused.returncode == 2 and "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    )
    assert json.loads(refused.stdout)["error"]["type"] == "BadInputError" and not (tmp_path / "refused.pt").exists()
