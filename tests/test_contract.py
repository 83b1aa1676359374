"""The pipeline contract across `onorm convert`, `inspect` and `export` (docs/contract.md, line by line).

What the per-command tests (test_cli_convert.py, test_cli_export.py, test_load.py,
test_export.py) do not cover: Ctrl-C and kill -9 of real processes, full and read-only
disks, failed writes, the --json failure shape of every command, the output reached
through another spelling of the input, non-finite numbers through the CLI, exit 3 for a
bug, and the exit codes documented where they are defined.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer

from onorm_convert import errors
from onorm_convert.checkpoint import make_checkpoint, write_checkpoint
from onorm_convert.cli import main as cli_main
from onorm_convert.convert import convert
from onorm_convert.files import write_atomically
from onorm_convert.load import build_arch

from conftest import MLP, MLP_ARCH, REPO, RESNET, RESNET_ARCH, SAMPLES, onorm

pytestmark = pytest.mark.usefixtures("in_repo")

SAMPLE_FILES = sorted(SAMPLES.glob("*.pt"))
_module_names = itertools.count()

ARCH_SOURCE = """
import torch
from torch import nn


class LogNet(nn.Module):
    # log of a normalized Linear: NaN wherever the normalized value is negative.
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.log(self.bn(self.fc(x)))


def log_net():
    return LogNet()
"""


def digests(*places: Path) -> dict[str, str]:
    """sha256 by path of each file given and each file under each folder given (hidden temp files included).

    Python's bytecode caches are left out: importing a model's code may write them.
    """
    files = [p for place in places for p in ([place] if place.is_file() else sorted(place.rglob("*")))]
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file() and "__pycache__" not in p.parts
    }


def assert_one_error_line(result, command: str, fragment: str) -> str:
    """The failure's stderr: exactly one line, the error line, containing ``fragment``, no traceback. Returns it."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"onorm {command}: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _reject_non_standard(constant: str):
    raise AssertionError(f"--json wrote {constant}, which strict JSON parsers reject")


def assert_json_failure(result, command: str, code: int, kind: str, fragment: str) -> dict:
    """Exit ``code``; stdout is one JSON object saying so, with the error the stderr line shows."""
    assert result.exit_code == code, result.output
    report = json.loads(result.stdout, parse_constant=_reject_non_standard)  # one strict document
    assert (report["command"], report["ok"], report["exit_code"], report["error"]["type"]) == (
        command,
        False,
        code,
        kind,
    )
    assert fragment in report["error"]["message"]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith(f"onorm {command}: error: ")]
    assert error_lines == [f"onorm {command}: error: {report['error']['message'].splitlines()[0]}"]
    assert "Traceback" not in result.stderr
    return report


@pytest.fixture
def arch_module(tmp_path, monkeypatch) -> str:
    """A fresh importable module of ARCH_SOURCE in the (temporary) current directory; yields its name."""
    name = f"contract_models_{os.getpid()}_{next(_module_names)}"
    (tmp_path / f"{name}.py").write_text(ARCH_SOURCE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


# --- exit codes: defined once, documented, and exit 3 for a bug ------------------------------------


def test_every_exit_code_is_defined_in_errors_and_documented():
    defined = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    table = (REPO / "docs" / "contract.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)}
    assert documented == set(defined.values()) == {0, 1, 2, 3, 130, 143}
    cli_app = importlib.import_module("onorm_convert.cli.app")
    assert all(
        getattr(errors, name) is value for name, value in vars(cli_app).items() if name.startswith("EXIT_")
    )  # no second definition


def test_a_bug_exits_3_with_one_line_and_shows_the_traceback_only_with_debug(monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("onorm_convert.cli.inspect_cmd.plan_conversion", broken)
    args = ["inspect", MLP, "--arch", MLP_ARCH]
    plain = onorm(*args, "--json")
    assert_json_failure(
        plain, "inspect", errors.EXIT_INTERNAL, "ZeroDivisionError", "this is a bug in onorm; rerun with --debug"
    )
    debug = onorm(*args, "--debug")
    assert debug.exit_code == 3 and "Traceback (most recent call last)" in debug.stderr and "in broken" in debug.stderr


def test_ctrl_c_wrapped_by_a_library_still_exits_130(monkeypatch):
    def interrupted_import(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:  # what pybind11 does when Ctrl-C hits a module's initialization
            raise ImportError("initialization failed") from err

    monkeypatch.setattr("onorm_convert.cli.inspect_cmd.plan_conversion", interrupted_import)
    result = onorm("inspect", MLP, "--arch", MLP_ARCH, "--json")
    assert_json_failure(
        result, "inspect", errors.EXIT_INTERRUPTED, "KeyboardInterrupt", "interrupted; nothing was written"
    )


# --- --json failures and --debug, for every command ----------------------------------------------


def write_nan_inputs(folder: Path) -> Path:
    path = folder / "real.npz"
    values = np.zeros((3, 64), dtype=np.float32)
    values[1, 5] = np.nan
    np.savez(path, x=values)
    return path


JSON_FAILURES = {
    "convert_missing_file": (["convert", "{tmp}/missing.pt"], "BadInputError", "no such file"),
    "convert_bad_ecm": (
        ["convert", MLP, "--arch", MLP_ARCH, "--ecm", "tanh", "-o", "{tmp}/out.pt"],
        "BadInputError",
        "--ecm 'tanh'",
    ),
    "inspect_text_file": (["inspect", "{tmp}/notes.txt"], "BadInputError", "is a text file"),
    "inspect_arch_not_importable": (
        ["inspect", MLP, "--arch", "nowhere:net"],
        "BadInputError",
        "cannot import 'nowhere'",
    ),
    "export_nan_inputs": (
        [
            "export",
            MLP,
            "--arch",
            MLP_ARCH,
            "--input-shape",
            "1,64",
            "--inputs",
            "{tmp}/real.npz",
            "-o",
            "{tmp}/m.onnx",
        ],
        "BadInputError",
        "input 0 contains NaN or Inf",
    ),
    "export_no_shape": (
        ["export", MLP, "--arch", MLP_ARCH, "-o", "{tmp}/m.onnx"],
        "BadInputError",
        "records no input shape",
    ),
}


@pytest.mark.parametrize("case", sorted(JSON_FAILURES))
def test_json_failure_is_one_object_on_stdout_and_one_line_on_stderr(tmp_path, case):
    args, kind, fragment = JSON_FAILURES[case]
    (tmp_path / "notes.txt").write_text("epoch,loss\n1,0.5\n")
    write_nan_inputs(tmp_path)
    before = digests(tmp_path, *SAMPLE_FILES)
    result = onorm(*[str(a).format(tmp=tmp_path) for a in args], "--json")
    assert_json_failure(result, args[0], 2, kind, fragment)
    assert digests(tmp_path, *SAMPLE_FILES) == before  # inputs untouched, nothing written


@pytest.mark.parametrize("command", ["convert", "inspect", "export"])
def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path, command):
    plain = onorm(command, tmp_path / "missing.pt")
    assert plain.exit_code == 2
    assert_one_error_line(plain, command, "no such file")
    debug = onorm(command, tmp_path / "missing.pt", "--debug")
    assert (
        debug.exit_code == 2 and "Traceback (most recent call last)" in debug.stderr and "BadInputError" in debug.stderr
    )
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


# --- the output may never be the input; --force is the only way to replace ------------------------


def other_spelling(kind: str, source: Path) -> Path:
    """``source`` reached another way: a relative path through .., a symlink, a hard link."""
    if kind == "dotdot":
        (source.parent / "sub").mkdir()
        return Path(os.path.relpath(source.parent / "sub" / ".." / source.name))
    if kind == "symlink":
        (source.parent / "link.pt").symlink_to(source)
        return source.parent / "link.pt"
    os.link(source, source.parent / "hardlink.pt")
    return source.parent / "hardlink.pt"


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("kind", ["dotdot", "symlink", "hardlink"])
def test_output_reaching_the_input_another_way_is_refused_even_with_force(tmp_path, command, kind):
    source = tmp_path / "mlp.pt"
    source.write_bytes(MLP.read_bytes())
    output = other_spelling(kind, source)
    before = digests(tmp_path)
    result = onorm(command, source, "--arch", MLP_ARCH, "--input-shape", "2,64", "-o", output, "--force")
    assert result.exit_code == 2
    assert_one_error_line(result, command, "the output may not be the input file; choose another path with -o")
    assert digests(tmp_path) == before


# --- the input is never modified, on success and on failure ----------------------------------------


def test_success_leaves_every_input_untouched_and_inspect_writes_nothing(tmp_path):
    pickled = tmp_path / "inputs" / "whole.pt"
    pickled.parent.mkdir()
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8)).eval()
    torch.save(model, pickled)
    before = digests(pickled.parent, *SAMPLE_FILES)
    inspected = onorm("inspect", pickled, "--trust", "--input-shape", "2,64")
    assert inspected.exit_code == 0, inspected.output
    assert digests(pickled.parent, *SAMPLE_FILES) == before  # inspect writes nothing, anywhere near its input
    out = tmp_path / "out" / "whole_onorm.pt"
    out.parent.mkdir()
    converted = onorm("convert", pickled, "--trust", "--input-shape", "2,64", "-o", out)
    assert converted.exit_code == 0, converted.output
    assert digests(pickled.parent, *SAMPLE_FILES) == before and sorted(p.name for p in out.parent.iterdir()) == [
        out.name
    ]


# --- atomic writes: interrupted, killed, out of space ---------------------------------------------


def start(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    """A real `python -m onorm_convert` process with the stop signals handled as in a terminal.

    A caller's ignored signals stay ignored in its children (and the CLI keeps them so): xdist
    workers may ignore SIGINT, and a test run under nohup or in a shell's background SIGHUP,
    SIGINT and SIGQUIT.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "onorm_convert", *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_stop_signals_default,
    )  # fmt: skip


def _stop_signals_default() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


def signal_after(process: subprocess.Popen, line_start: str, signum: int) -> tuple[int, str]:
    """Send ``signum`` once the process printed a stderr line starting with ``line_start``; its exit code and stderr."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(line_start):
            process.send_signal(signum)
            break
    else:
        process.wait(timeout=60)
        pytest.fail(f"the process ended before printing {line_start!r}: {''.join(seen)}")
    seen.append(process.stderr.read())
    return process.wait(timeout=60), "".join(seen)


@pytest.mark.parametrize("step", ["exporting to ONNX", "verifying against the PyTorch model"])
@pytest.mark.slow
def test_ctrl_c_during_export_exits_130_and_leaves_the_old_output_alone(tmp_path, step):
    out = tmp_path / "deploy" / "resnet.onnx"
    out.parent.mkdir()
    out.write_bytes(b"the previous release")
    before = digests(out.parent, *SAMPLE_FILES)
    process = start("export", RESNET, "--arch", RESNET_ARCH, "--input-shape", "1,1,8,8", "-o", out, "--force")
    code, stderr = signal_after(process, step, signal.SIGINT)
    assert code == errors.EXIT_INTERRUPTED, stderr
    assert (
        stderr.strip().splitlines()[-1] == "onorm export: error: interrupted; nothing was written"
        and "Traceback" not in stderr
    )
    assert digests(out.parent, *SAMPLE_FILES) == before  # no temp file left, the old output and the input unchanged


@pytest.mark.slow
def test_sigterm_during_export_exits_143_and_leaves_the_old_output_alone(tmp_path):
    """A pipeline's timeout or a stopping container sends SIGTERM: it unwinds as Ctrl-C does."""
    out = tmp_path / "deploy" / "resnet.onnx"
    out.parent.mkdir()
    out.write_bytes(b"the previous release")
    before = digests(out.parent, *SAMPLE_FILES)
    process = start("export", RESNET, "--arch", RESNET_ARCH, "--input-shape", "1,1,8,8", "-o", out, "--force")
    code, stderr = signal_after(process, "verifying against the PyTorch model", signal.SIGTERM)
    assert code == errors.EXIT_TERMINATED, stderr
    assert stderr.strip().splitlines()[-1] == "onorm export: error: terminated (SIGTERM); no partial output was left"
    assert "Traceback" not in stderr
    assert digests(out.parent, *SAMPLE_FILES) == before  # no temp file left, the old output and the input unchanged


def test_sigterm_outside_a_command_body_still_exits_143_with_its_line(monkeypatch, capsys):
    """A SIGTERM while the parser runs a callback (here --version): the 143 line, not the parser's silent 130."""
    real_echo, sent = typer.echo, []

    def echo_after_a_sigterm(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler main() installed
        return real_echo(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(typer, "echo", echo_after_a_sigterm)
    assert cli_main(["--version"]) == errors.EXIT_TERMINATED
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == "onorm: error: terminated (SIGTERM); no partial output was left"
    )
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


@pytest.mark.slow
def test_ctrl_c_during_convert_exits_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "out.pt"
    # '1' is left as is with a warning; the check that follows runs 4 passes over a large batch (seconds).
    process = start(
        "convert", RESNET, "--arch", RESNET_ARCH, "--exclude", "1", "--input-shape", "16,1,128,128", "-o", out
    )
    code, stderr = signal_after(process, "onorm: warning: '1' (BatchNorm2d) left as is", signal.SIGINT)
    assert code == errors.EXIT_INTERRUPTED and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "onorm convert: error: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_kill_9_before_the_rename_leaves_the_old_output(tmp_path):
    out = tmp_path / "resnet.onnx"
    out.write_bytes(b"the previous release")
    process = start("export", RESNET, "--arch", RESNET_ARCH, "--input-shape", "1,1,8,8", "-o", out, "--force")
    code, _ = signal_after(
        process, "verifying against the PyTorch model", signal.SIGKILL
    )  # the new file is complete, not yet renamed
    assert code == -signal.SIGKILL and out.read_bytes() == b"the previous release"
    (leftover,) = set(tmp_path.iterdir()) - {out}  # a killed process cannot clean up: its hidden temp folder stays
    # export stages in a hidden folder, the file under its final name (so that external data keeps its name)
    assert re.fullmatch(r"\.resnet\.onnx\.\w+\.tmp", leftover.name) and (leftover / "resnet.onnx").stat().st_size > 0


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from onorm_convert.files import write_atomically
from onorm_convert.load import build_arch


def half_then_die(tmp):
    with open(tmp, "wb") as handle:
        handle.write(b"new bytes, the first half")
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

write_atomically(Path(sys.argv[1]), half_then_die)
"""


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_write_leaves_the_old_output(tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old bytes")
    process = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(out)], capture_output=True, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert out.read_bytes() == b"old bytes"
    (leftover,) = set(tmp_path.iterdir()) - {out}
    assert leftover.name.startswith(".model.pt.") and leftover.read_bytes() == b"new bytes, the first half"


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A tmpfs mounted at ``folder``; skips the test where mounting is not permitted."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield folder
    finally:
        # Lazy: a failed torch writer, kept alive by its exception's traceback, may still hold a file open there.
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """An 8 KiB file system holding an old 4 KiB ``out`` file: no room for any of the models (10 KiB and more)."""
    with mounted_tmpfs(tmp_path / "disk", "size=8k") as folder:
        (folder / "out").write_bytes(b"o" * 4096)
        yield folder


@pytest.mark.parametrize("command", ["convert", "export"])
def test_full_disk_is_a_clear_error_and_keeps_the_old_output(full_disk, command):
    before = digests(full_disk, *SAMPLE_FILES)
    extra = ["--format", "torch"] if command == "export" else []
    result = onorm(
        command, RESNET, "--arch", RESNET_ARCH, "--input-shape", "1,1,8,8", "-o", full_disk / "out", "--force", *extra
    )
    assert result.exit_code == 2, result.output
    errors_ = [line for line in result.stderr.splitlines() if line.startswith(f"onorm {command}: error:")]
    assert errors_ == [
        f"onorm {command}: error: {full_disk / 'out'}: cannot write the output (No space left on device); free some space or choose another -o. Nothing was written"
    ]
    assert "Traceback" not in result.stderr and digests(full_disk, *SAMPLE_FILES) == before


def test_full_disk_while_writing_onnx(full_disk):
    result = onorm(
        "export", MLP, "--arch", MLP_ARCH, "--input-shape", "1,64", "-o", full_disk / "out", "--force", "--json"
    )
    assert_json_failure(result, "export", 2, "BadInputError", "cannot write the output (No space left on device)")
    assert (full_disk / "out").read_bytes() == b"o" * 4096 and sorted(p.name for p in full_disk.iterdir()) == ["out"]


def test_read_only_output_folder(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=4k") as folder:
        result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", folder / "out.pt")
        assert result.exit_code == 2
        assert_one_error_line(result, "convert", "is not writable; choose another -o")


@pytest.mark.parametrize(
    ("target", "failure"),
    [
        ("os.fsync", OSError(errno.ENOSPC, "No space left on device")),
        ("tempfile.mkstemp", OSError(errno.EIO, "Input/output error")),
    ],
)
def test_a_failing_write_is_exit_2_not_an_internal_error(tmp_path, monkeypatch, target, failure):
    out = tmp_path / "out.pt"
    out.write_bytes(b"old bytes")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(target, fail)
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", out, "--force", "--json")
    report = assert_json_failure(
        result, "convert", 2, "BadInputError", f"{out}: cannot write the output ({failure.strerror})"
    )
    assert report["error"]["message"].endswith("Nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"] and out.read_bytes() == b"old bytes"


def test_any_other_os_error_is_exit_2_naming_the_file(monkeypatch, tmp_path):
    def unreadable(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("onorm_convert.load._refuse_foreign_formats", unreadable)
    result = onorm("inspect", MLP, "--arch", MLP_ARCH, "--json")
    assert_json_failure(
        result,
        "inspect",
        2,
        "PermissionError",
        f"{MLP}: Permission denied; check the path, its permissions and the free space",
    )


def test_published_files_get_the_usual_permissions_not_the_temp_files(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "m.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o640  # tempfile.mkstemp makes 0o600


# --- numerical faults through the CLI ----------------------------------------------------------------


def mlp_state_with(tmp_path: Path, stat: str, value: float) -> Path:
    state = torch.load(MLP, weights_only=True)
    state[stat][2] = value
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    return path


def test_convert_refuses_non_finite_statistics(tmp_path):
    path = mlp_state_with(tmp_path, "1.running_var", float("nan"))
    before = digests(tmp_path)
    result = onorm("convert", path, "--arch", MLP_ARCH, "--input-shape", "2,64", "--json")
    assert_json_failure(result, "convert", 2, "BadInputError", "'1': its running_var contains NaN or Inf")
    assert digests(tmp_path) == before


def test_export_refuses_non_finite_statistics_of_a_converted_model(tmp_path):
    from sample_models import models

    model = models.digits_mlp()
    model.load_state_dict(torch.load(MLP, weights_only=True))
    converted = convert(model)
    converted[1].running_mean[0] = float("inf")
    path = tmp_path / "mlp_onorm.pt"
    write_checkpoint(
        path,
        make_checkpoint(converted, arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"}, input_shapes=[(2, 64)]),
    )
    before = digests(tmp_path)
    result = onorm("export", path, "--json")
    assert_json_failure(
        result,
        "export",
        2,
        "BadInputError",
        "layer '1' (OnlineNorm1d): its running statistics or affine parameters are not finite",
    )
    assert digests(tmp_path) == before


def test_convert_check_producing_nan_exits_1(tmp_path, arch_module):
    torch.save(build_arch(f"{arch_module}:log_net", {}).state_dict(), tmp_path / "log.pt")
    before = digests(tmp_path)
    result = onorm(
        "convert", "log.pt", "--arch", f"{arch_module}:log_net", "--input-shape", "4,64", "-o", "out.pt", "--json"
    )
    assert_json_failure(result, "convert", 1, "VerificationError", "output 0 of the original model contains NaN or Inf")
    assert digests(tmp_path) == before


def test_export_verification_producing_nan_exits_1_and_is_never_verified(tmp_path, arch_module):
    torch.save(build_arch(f"{arch_module}:log_net", {}).state_dict(), tmp_path / "log.pt")
    before = digests(tmp_path)
    result = onorm("export", "log.pt", "--arch", f"{arch_module}:log_net", "--input-shape", "4,64", "--json")
    report = assert_json_failure(result, "export", 1, "ExportMismatchError", "MISMATCH")
    failed = [check for check in report["verification"]["checks"] if not check["passed"]]
    assert (
        failed
        and not report["verification"]["passed"]
        and all("non-finite (NaN/Inf) values" in c["problem"] for c in failed)
    )
    assert report["path"] is None and digests(tmp_path) == before


def test_keep_failed_never_replaces_an_existing_file_without_force(tmp_path, arch_module):
    torch.save(build_arch(f"{arch_module}:log_net", {}).state_dict(), tmp_path / "log.pt")
    kept = tmp_path / "log.verification-failed.onnx"
    kept.write_bytes(b"an earlier failure someone is looking at")
    result = onorm("export", "log.pt", "--arch", f"{arch_module}:log_net", "--input-shape", "4,64", "--keep-failed")
    assert result.exit_code in (1, 2) and kept.read_bytes() == b"an earlier failure someone is looking at"


@pytest.mark.slow
def test_real_processes_give_json_and_no_traceback(tmp_path):
    # convert's real process: test_cli_convert.py::test_real_process_exit_codes
    for args in (["inspect", tmp_path], ["export", MLP, "--arch", MLP_ARCH, "--opset", "99", "--input-shape", "1,64"]):
        done = subprocess.run(
            [sys.executable, "-m", "onorm_convert", *map(str, args), "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        report = json.loads(done.stdout)
        assert done.returncode == report["exit_code"] == 2 and report["command"] == args[0] and not report["ok"]
        assert done.stderr.strip().splitlines() == [f"onorm {args[0]}: error: {report['error']['message']}"]


@pytest.mark.parametrize(
    "args, command, message",
    [
        (["export", "--bogus"], "export", "No such option: --bogus; see onorm export --help"),
        (["convert"], "convert", "Missing argument 'model'; see onorm convert --help"),
        (["nosuch"], None, "No such command 'nosuch'; see onorm --help"),
    ],
)
def test_parser_usage_errors_follow_the_contract(capsys, args, command, message):
    """The argument parser's own errors: one line on stderr, a JSON object under --json, exit 2."""
    assert cli_main([*args, "--json"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["command"] == command and report["exit_code"] == 2 and not report["ok"]
    assert report["error"]["message"] == message
    assert err.strip().splitlines() == [f"onorm{' ' + command if command else ''}: error: {message}"]


def test_the_inputs_file_is_an_input_too(tmp_path):
    """`--inputs` may never be overwritten by the output, --force or not."""
    inputs = tmp_path / "val.npy"
    np.save(inputs, np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32))
    before = inputs.read_bytes()
    result = onorm(
        "export", MLP, "--arch", MLP_ARCH, "--input-shape", "1,64", "--inputs", inputs, "-o", inputs, "--force"
    )
    assert result.exit_code == 2
    assert_one_error_line(result, "export", "may not be the input")
    assert inputs.read_bytes() == before


def test_static_batch_refuses_inputs_of_another_batch(tmp_path):
    inputs = tmp_path / "val.npy"
    np.save(inputs, np.zeros((3, 64), dtype=np.float32))
    args = (
        "export",
        MLP,
        "--arch",
        MLP_ARCH,
        "--input-shape",
        "2,64",
        "--inputs",
        inputs,
        "--static-batch",
        "-o",
        tmp_path / "m.onnx",
    )
    result = onorm(*args)
    assert result.exit_code == 2
    assert_one_error_line(result, "export", "--static-batch fixes it to 2")
    assert not (tmp_path / "m.onnx").exists()
