"""`onorm export` end to end: every flag, the exit codes (0 verified, 1 mismatch, 2 bad input), no traceback."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onorm_convert import convert
from onorm_convert.checkpoint import make_checkpoint, write_checkpoint
from sample_models import models

from conftest import MLP_ARCH, REPO
from conftest import onorm as onorm_cli

ARCH = MLP_ARCH
pytestmark = pytest.mark.usefixtures("in_repo")

LIAR_MODULE = """
import torch
from torch import nn


@torch.fx.wrap
def lie_when_exported(y):
    return y + 0.01 if torch.compiler.is_exporting() else y


class Liar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return lie_when_exported(self.bn(self.fc(x)))


def liar():
    return Liar()
"""


def onorm(*args) -> object:
    """``onorm export ARGS``."""
    return onorm_cli("export", *args)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trained_mlp() -> torch.nn.Module:
    model = models.digits_mlp()
    model.load_state_dict(torch.load(REPO / "sample_models" / "digits_mlp.pt", weights_only=True))
    return model.eval()


@pytest.fixture
def state_dict_file(tmp_path) -> Path:
    path = tmp_path / "mlp.pt"
    torch.save(trained_mlp().state_dict(), path)
    return path


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    """A converted digits_mlp in onorm's checkpoint, recording input shape (2, 64)."""
    path = tmp_path / "mlp_onorm.pt"
    converted = convert(trained_mlp())
    write_checkpoint(
        path, make_checkpoint(converted, arch=ARCH, arch_kwargs={}, conversion={"ecm": "clamp"}, input_shapes=[(2, 64)])
    )
    return path


@pytest.mark.slow
def test_checkpoint_exports_beside_the_input_with_recorded_shapes(checkpoint_file: Path) -> None:
    before = digest(checkpoint_file)
    result = onorm(checkpoint_file)
    assert result.exit_code == 0, result.output
    out = checkpoint_file.with_suffix(".onnx")
    assert out.is_file() and digest(checkpoint_file) == before
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["layer", "type", "action", "into"]
    assert lines[1].split()[:4] == ["1", "OnlineNorm1d", "folded", "0"]
    assert (
        "folded 1 of 1 normalization layers" in result.stdout and "ONNX ops: Clip 1, Gemm 2" in result.stdout
    )  # Relu merged into the Clip
    assert "random batch 1" in result.stdout and "random batch 2" in result.stdout
    assert f"exported (verified) -> {out}" in result.stdout
    assert "folding normalization layers" in result.stderr and "verifying against the PyTorch model" in result.stderr


def test_json_strip_clamp_real_inputs_and_output_flag(checkpoint_file: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "real.npz", x=np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32))
    out = tmp_path / "deploy" / "m.onnx"
    out.parent.mkdir()
    result = onorm(
        checkpoint_file,
        "--strip-clamp",
        "--inputs",
        tmp_path / "real.npz",
        "-o",
        out,
        "--json",
        "--atol",
        "1e-3",
        "--rtol",
        "1e-2",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["path"] == str(out) and out.is_file()
    assert report["op_counts"] == {"Gemm": 2, "Relu": 1} and report["fold"]["steps"][0]["ecm"] == "clamp stripped"
    checks = report["verification"]["checks"]
    assert (
        report["verification"]["passed"]
        and {c["atol"] for c in checks} == {1e-3}
        and {c["rtol"] for c in checks} == {1e-2}
    )
    assert checks[-1]["batch"] == "real inputs (batch 5)"
    assert [layer["layer"] for layer in report["clamp_audit"]["layers"]] == ["1"]
    assert report["clamp_audit"]["clean"] == (report["clamp_audit"]["max_output_change"] == 0.0)


def test_static_batch_and_opset(state_dict_file: Path) -> None:
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "3,64", "--static-batch", "--opset", "18")
    assert result.exit_code == 0, result.output
    model = onnx.load(state_dict_file.with_suffix(".onnx"))
    assert [entry.version for entry in model.opset_import if entry.domain == ""] == [18]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert "random batch 3" in result.stdout and "random batch 1" not in result.stdout


def test_format_torch_writes_a_loadable_program(state_dict_file: Path) -> None:
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "--format", "torch")
    assert result.exit_code == 0, result.output
    program = torch.export.load(str(state_dict_file.with_suffix(".pt2")))
    x = torch.randn(4, 64)
    torch.testing.assert_close(program.module()(x), trained_mlp()(x), atol=1e-5, rtol=1e-5)


def test_no_verify_publishes_with_a_notice(state_dict_file: Path) -> None:
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"] is None and state_dict_file.with_suffix(".onnx").is_file()
    assert "verification skipped" in result.stderr


def test_existing_output_needs_force(state_dict_file: Path) -> None:
    out = state_dict_file.with_suffix(".onnx")
    out.write_bytes(b"old")
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64")
    assert result.exit_code == 2 and "already exists; pass --force" in result.stderr and out.read_bytes() == b"old"
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "--force")
    assert result.exit_code == 0, result.output
    assert onnx.load(out).graph.node


def test_output_may_not_be_the_input(state_dict_file: Path) -> None:
    before = digest(state_dict_file)
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "-o", state_dict_file, "--force")
    assert result.exit_code == 2 and "may not be the input" in result.stderr and digest(state_dict_file) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "records no input shape; pass --input-shape"),
        (["--input-shape", "3x64"], "expected comma-separated positive integers"),
        (["--input-shape", "1,63"], "layer '0' failed"),
        (["--input-shape", "1,64", "--opset", "99"], "--opset 99: out of range; choose 18 to 23"),
        (["--input-shape", "1,64", "--format", "tflite"], "--format 'tflite': expected onnx or torch"),
        (["--input-shape", "1,64", "--atol", "-1"], "--atol -1.0: must be a finite number >= 0"),
        (["--input-shape", "1,64", "--rtol", "nan"], "--rtol nan: must be a finite number >= 0"),
        (["--input-shape", "1,64", "--inputs", "missing.npy"], "--inputs missing.npy: no such file"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(state_dict_file: Path, extra: list, message: str) -> None:
    before = digest(state_dict_file)
    result = onorm(state_dict_file, "--arch", ARCH, *extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("onorm export: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in state_dict_file.parent.iterdir()) == ["mlp.pt"] and digest(state_dict_file) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--opset", "5"], "--opset 5: out of range; choose 18 to 23"),
        (["--rtol", "inf"], "--rtol inf: must be a finite number >= 0"),
    ],
)
def test_an_option_the_library_refuses_is_named_by_its_flag(state_dict_file: Path, flags: list, message: str) -> None:
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "--json", *flags)
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "BadInputError" and error["message"].startswith(message)  # the type JSON always had


def test_inputs_that_do_not_fit_exit_2(state_dict_file: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((4, 32), dtype=np.float32))
    result = onorm(
        state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "--inputs", tmp_path / "wrong.npy", "--json"
    )
    assert result.exit_code == 2 and "input 0 has shape (4, 32), expected (N, 64)" in result.stderr
    assert json.loads(result.stdout)["error"]["type"] == "BadInputError"


def test_trust_is_needed_for_a_pickled_module(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(trained_mlp(), path)
    refused = onorm(path, "--input-shape", "1,64")
    assert refused.exit_code == 2 and "--trust" in refused.stderr
    result = onorm(path, "--input-shape", "1,64", "--trust")
    assert result.exit_code == 0, result.output


def test_key_and_arch_kwargs(tmp_path: Path) -> None:
    path = tmp_path / "train_ckpt.pt"
    torch.save({"epoch": 3, "weights": models.digits_mlp(hidden=16).state_dict()}, path)
    result = onorm(
        path, "--arch", ARCH, "--arch-kwargs", '{"hidden": 16}', "--key", "weights", "--input-shape", "1,64", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fold"]["steps"][0]["norm"] == "1"


@pytest.fixture
def liar_file(tmp_path: Path, monkeypatch) -> Path:
    """A model that computes something else while exported, built by ``--arch liarmodels:liar`` from ``tmp_path``."""
    (tmp_path / "liarmodels.py").write_text(LIAR_MODULE)
    sys.modules.pop("liarmodels", None)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "liar.pt"
    exec(compile(LIAR_MODULE, "liarmodels", "exec"), namespace := {})
    torch.save(namespace["liar"]().state_dict(), path)
    return path


@pytest.mark.parametrize("keep_failed", [False, True])
def test_mismatch_exits_1_and_leaves_nothing_at_the_destination(liar_file: Path, keep_failed: bool) -> None:
    flags = ["--keep-failed"] if keep_failed else []
    result = onorm(liar_file, "--arch", "liarmodels:liar", "--input-shape", "1,64", "--json", *flags)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"] and not report["verification"]["passed"] and report["path"] is None
    assert "MISMATCH" in result.stderr and "Traceback" not in result.stderr
    assert not liar_file.with_suffix(".onnx").exists()
    assert liar_file.with_name("liar.verification-failed.onnx").exists() == keep_failed


def test_debug_shows_the_traceback(state_dict_file: Path) -> None:
    result = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "--opset", "5", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "--opset 5: out of range" in result.stderr


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onorm_convert", "export", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_real_process_exit_codes_and_no_traceback(liar_file: Path, state_dict_file: Path) -> None:
    # --format torch: the same exit-1 path as ONNX, without the ONNX exporter's start-up cost in a fresh process
    mismatch = run_cli(
        liar_file, "--arch", "liarmodels:liar", "--input-shape", "1,64", "--format", "torch", cwd=liar_file.parent
    )
    assert mismatch.returncode == 1 and "Traceback" not in mismatch.stderr and "Warning" not in mismatch.stderr
    assert "MISMATCH" in mismatch.stderr and not liar_file.with_suffix(".pt2").exists()
    bad = run_cli(state_dict_file, "--arch", ARCH, "--input-shape", "0,64", cwd=REPO)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "onorm export: error: --input-shape '0,64': dimensions must be positive, e.g. 1,3,224,224"
    ]


def test_text_names_the_opset_the_json_reports(state_dict_file: Path) -> None:
    text = onorm(state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "-o", state_dict_file.with_suffix(".a.onnx"))
    as_json = onorm(
        state_dict_file, "--arch", ARCH, "--input-shape", "1,64", "-o", state_dict_file.with_suffix(".b.onnx"), "--json"
    )
    assert text.exit_code == as_json.exit_code == 0, text.output + as_json.output
    opset = json.loads(as_json.stdout)["opset"]
    assert isinstance(opset, int) and f"ONNX opset {opset}\n" in text.stdout
    assert "opset default" not in text.output


def test_strip_clamp_without_inputs_says_what_it_verified_against(checkpoint_file: Path) -> None:
    result = onorm(checkpoint_file, "--strip-clamp")
    assert result.exit_code == 0, result.output
    assert "against the PyTorch model with the clamp stripped" in result.stdout
    assert "against the PyTorch model with its clamp (as trained) (for information, not verified)" in result.stdout
    assert "verified against the PyTorch model with the clamp stripped on random inputs only" in result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("batch "))
    assert "passes by" in header and "smallest atol/rtol" in header and "top-1/top-5" in header


def test_save_failing_names_the_saved_batches(liar_file: Path) -> None:
    folder = liar_file.parent / "failing"
    result = onorm(liar_file, "--arch", "liarmodels:liar", "--input-shape", "1,64", "--save-failing", folder, "--json")
    assert result.exit_code == 1, result.output
    saved = json.loads(result.stdout)["saved_failing"]
    assert sorted(Path(path).name for path in saved) == ["failing-random-batch-1.npz", "failing-random-batch-2.npz"]
    assert sorted(folder.iterdir()) == sorted(map(Path, saved)) and all(path in result.stderr for path in saved)
