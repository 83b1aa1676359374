"""The contract under hostile code, streams, signals and file kinds (issue 11; docs/contract.md).

The model's code that prints or exits, outputs that are links, devices or that another run
writes first, --inputs of every dtype, sizes torch cannot allocate, signals during start-up,
after the report and other than SIGTERM, a stdout that fails, damaged values, a model with no
tensor output, and file names that are long or hold a newline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_contract import (
    MLP,
    MLP_ARCH,
    REPO,
    assert_json_failure,
    assert_one_error_line,
    digests,
    onorm,
    signal_after,
    start,
)

import onorm_launch
from onorm_convert import errors
from onorm_convert.checkpoint import make_checkpoint
from onorm_convert.cli import main as cli_main
from onorm_convert.convert import convert
from onorm_convert.errors import BadInputError
from onorm_convert.inputs import load_input_file, parse_input_shape, random_inputs

pytestmark = pytest.mark.usefixtures("in_repo")

USER_CODE = """
import os
import sys

import torch
from torch import nn


class Net(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(64, 8), nn.BatchNorm1d(8))


class Chatty(Net):
    def forward(self, x):
        print("printed by forward")
        return super().forward(x)


class NoTensor(Net):
    def __init__(self, result):
        super().__init__()
        self.result = result

    def forward(self, x):
        super().forward(x)
        return self.result


def net():
    return Net()


def chatty():
    print("printed by the factory")
    os.system("echo written to fd 1 by a child process")
    return Chatty()


def exits_0():
    sys.exit(0)


def exits_with_a_message():
    sys.exit("goodbye")


def returns_none():
    return NoTensor(None)


def returns_an_int():
    return NoTensor(7)
"""


@pytest.fixture
def user_code(tmp_path, monkeypatch) -> str:
    """A fresh importable module of USER_CODE in the (temporary) current directory, with Net's weights in net.pt; yields its name."""
    name = f"hostile_models_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    torch.save(module.Net().eval().state_dict(), tmp_path / "net.pt")
    yield name
    sys.modules.pop(name, None)


def run_cli(*args, **popen) -> subprocess.CompletedProcess:
    """A real `python -m onorm_convert` process."""
    return subprocess.run([sys.executable, "-m", "onorm_convert", *map(str, args)], text=True, timeout=120, **popen)


# --- the model's code that prints or exits ----------------------------------------------------------------


@pytest.mark.slow
def test_what_the_models_code_prints_goes_to_stderr_and_stdout_holds_the_report(tmp_path, user_code):
    """Python prints (factory, forward) and a child process writing to fd 1: none of it reaches stdout."""
    done = run_cli("convert", "net.pt", "--arch", f"{user_code}:chatty", "--input-shape", "2,64", "-o", "out.pt", "--json",
                   cwd=tmp_path, capture_output=True)  # fmt: skip
    report = json.loads(done.stdout)  # one JSON document, nothing else
    assert done.returncode == report["exit_code"] == 0 and report["command"] == "convert"
    for text in ("printed by the factory", "printed by forward", "written to fd 1 by a child process"):
        assert text in done.stderr


@pytest.mark.parametrize("factory, code", [("exits_0", "0"), ("exits_with_a_message", "'goodbye'")])
def test_sys_exit_in_the_models_code_exits_2_with_the_one_line(tmp_path, user_code, factory, code):
    before = digests(tmp_path)
    result = onorm("convert", "net.pt", "--arch", f"{user_code}:{factory}", "-o", "out.pt", "--json")
    assert_json_failure(result, "convert", 2, "SystemExit", f"the model's code called sys.exit({code})")
    assert digests(tmp_path) == before


# --- the output: links, devices, FIFOs, and another run writing it first -----------------------------------


def test_a_dangling_link_as_output_is_refused_and_creates_nothing(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out.pt").symlink_to(tmp_path / "elsewhere" / "target.pt")
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", tmp_path / "out.pt")
    assert result.exit_code == 2
    assert_one_error_line(result, "convert", "is a symbolic link")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_force_never_replaces_a_links_target_in_another_folder(tmp_path):
    target = tmp_path / "elsewhere" / "release.pt"
    target.parent.mkdir()
    target.write_bytes(b"someone else's file")
    (tmp_path / "out.pt").symlink_to(target)
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", tmp_path / "out.pt", "--force")
    assert result.exit_code == 2
    assert_one_error_line(result, "convert", "is a symbolic link")
    assert target.read_bytes() == b"someone else's file" and (tmp_path / "out.pt").is_symlink()


def test_force_never_replaces_a_fifo(tmp_path):
    fifo = tmp_path / "out.pt"
    os.mkfifo(fifo)
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", fifo, "--force")
    assert result.exit_code == 2
    assert_one_error_line(result, "convert", "is not a regular file")
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_force_never_replaces_a_character_device(tmp_path):
    """A null device of its own (never the system's /dev/null: a regression run as root would replace it)."""
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node is not permitted here")
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", device, "--force")
    assert result.exit_code == 2
    assert_one_error_line(result, "convert", f"{device}: is not a regular file")
    assert device.is_char_device()


def another_run_writes(destination: Path, real):
    """``real``, after another run has published its own file at ``destination``."""

    def wrapper(*args, **kwargs):
        destination.write_bytes(b"the other run's verified output")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    "command, step",
    [("convert", "onorm_convert.cli.convert_cmd.make_checkpoint"), ("export", "onorm_convert.export.op_type_counts")],
)
def test_without_force_a_run_never_replaces_what_another_run_published_meanwhile(tmp_path, monkeypatch, command, step):
    out = tmp_path / "out.bin"
    module, _, name = step.rpartition(".")
    monkeypatch.setattr(step, another_run_writes(out, getattr(sys.modules[module], name)))
    result = onorm(command, MLP, "--arch", MLP_ARCH, "--input-shape", "2,64", "-o", out, "--json")
    assert_json_failure(
        result, command, 2, "BadInputError", f"{out}: appeared while onorm was writing it (another run?)"
    )
    assert out.read_bytes() == b"the other run's verified output" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.bin"
    ]


# --- --inputs of every dtype, and sizes ------------------------------------------------------------------


def save_npy(folder: Path, name: str, array) -> Path:
    np.save(folder / name, array)
    return folder / name


def npz_with_a_text_member(folder: Path) -> Path:
    import zipfile

    path = folder / "mixed.npz"
    np.savez(path, x=np.zeros((2, 64), np.float32))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", "not an array")
    return path


def saved_tensor(folder: Path, tensor: torch.Tensor) -> Path:
    torch.save(tensor, folder / "t.pt")
    return folder / "t.pt"


BAD_INPUTS = {
    "str": (lambda d: save_npy(d, "a.npy", np.array([["a"] * 64])), "has dtype <U1"),
    "longdouble": (lambda d: save_npy(d, "a.npy", np.zeros((2, 64), np.longdouble)), "has dtype float128"),
    "datetime64": (lambda d: save_npy(d, "a.npy", np.zeros((2, 64), "datetime64[s]")), "has dtype datetime64[s]"),
    "structured": (
        lambda d: save_npy(d, "a.npy", np.zeros((2, 64), [("a", "<f4"), ("b", "<i4")])),
        "has dtype [('a', '<f4'), ('b', '<i4')]",
    ),
    "int64": (
        lambda d: save_npy(d, "a.npy", np.zeros((2, 64), np.int64)),
        "has dtype int64; onorm verifies on floating-point inputs",
    ),
    "uint8": (lambda d: save_npy(d, "a.npy", np.zeros((2, 64), np.uint8)), "has dtype uint8"),
    "bool": (lambda d: save_npy(d, "a.npy", np.zeros((2, 64), bool)), "has dtype bool"),
    "complex": (lambda d: save_npy(d, "a.npy", np.zeros((2, 64), np.complex64)), "has dtype complex64"),
    "npz_named_npy": (
        lambda d: (np.savez(d / "a.npz", x=np.zeros((2, 64))), (d / "a.npz").rename(d / "a.npy"), d / "a.npy")[-1],
        "is an .npz archive, not one .npy array; name it .npz",
    ),
    "npz_text_member": (npz_with_a_text_member, "member 'notes.txt' is not a .npy array"),
    "sparse": (
        lambda d: saved_tensor(d, torch.zeros(2, 64).to_sparse()),
        "is a torch.sparse_coo tensor; save a dense one",
    ),
    "meta": (lambda d: saved_tensor(d, torch.zeros(2, 64, device="meta")), "is a meta tensor"),
    "torch_int": (lambda d: saved_tensor(d, torch.zeros(2, 64, dtype=torch.int32)), "has dtype torch.int32"),
    "quantized": (
        lambda d: saved_tensor(d, torch.quantize_per_tensor(torch.zeros(2, 64), 0.1, 0, torch.quint8)),
        "has dtype torch.quint8",
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation notices for quantized tensors
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_inputs_of_a_dtype_onorm_cannot_verify_on_name_the_file_and_the_problem(tmp_path, case):
    make, fragment = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(BadInputError) as caught:
        load_input_file(path)
    assert str(caught.value).startswith(f"--inputs {path}: ") and fragment in str(caught.value)


def test_bad_input_dtype_through_the_cli_is_exit_2_not_a_shape_problem(tmp_path):
    path = save_npy(tmp_path, "ints.npy", np.zeros((3, 64), np.int64))
    result = onorm(
        "export",
        MLP,
        "--arch",
        MLP_ARCH,
        "--input-shape",
        "1,64",
        "--inputs",
        path,
        "-o",
        tmp_path / "m.onnx",
        "--json",
    )
    report = assert_json_failure(result, "export", 2, "BadInputError", f"--inputs {path}: input 0 has dtype int64")
    assert "--input-shape" not in report["error"]["message"] and not (tmp_path / "m.onnx").exists()


def test_big_endian_floats_are_read_as_their_values(tmp_path):
    values = np.random.default_rng(0).standard_normal((2, 64))
    (tensor,) = load_input_file(save_npy(tmp_path, "be.npy", values.astype(">f4")))
    assert torch.equal(tensor, torch.from_numpy(values.astype(np.float32)))


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ("100000000000,100000000000", "more than torch can index"),
        ("1000000,1000000", "GiB as float32), more than this machine's"),
    ],
)
def test_an_input_shape_too_big_is_bad_input_naming_the_size(shape, fragment):
    with pytest.raises(BadInputError, match=rf"--input-shape '{shape}': .*{re.escape(fragment)}"):
        parse_input_shape(shape)


def test_an_input_shape_too_big_recorded_in_a_checkpoint_is_exit_2_naming_the_size(tmp_path):
    from sample_models import models

    model = convert(models.digits_mlp())
    checkpoint = make_checkpoint(
        model, arch=MLP_ARCH, arch_kwargs={}, conversion={"ecm": "clamp"}, input_shapes=[(10**6, 10**6)]
    )
    torch.save(checkpoint, tmp_path / "huge.pt")
    result = onorm("export", tmp_path / "huge.pt", "--arch", MLP_ARCH, "-o", tmp_path / "m.onnx", "--json")
    assert_json_failure(
        result, "export", 2, "BadInputError", "an example input of shape (1000000, 1000000): 1,000,000,000,000 values"
    )


def test_a_random_input_that_cannot_be_allocated_is_bad_input(monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "randn", no_memory)
    with pytest.raises(BadInputError, match=r"shape \(2, 64\): cannot be allocated \(DefaultCPUAllocator"):
        random_inputs([(2, 64)])


# --- signals: during start-up, after the report, and other than SIGTERM ----------------------------------


def test_the_launcher_takes_the_same_signals_as_the_cli():
    assert onorm_launch.STOP_SIGNALS == errors.STOP_SIGNALS


def wait_until_it_catches(process: subprocess.Popen, signum: int) -> None:
    """Until ``process`` has a handler for ``signum`` (the kernel's SigCgt mask): onorm_launch ran its first lines."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = Path(f"/proc/{process.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.005)
    pytest.fail("onorm_launch never took the signals")


@pytest.mark.parametrize(
    "signum, delay", [(signal.SIGINT, 0.0), (signal.SIGINT, 0.4), (signal.SIGINT, 0.7), (signal.SIGTERM, 0.4)]
)
@pytest.mark.slow
def test_a_signal_during_start_up_exits_with_the_one_line(tmp_path, signum, delay):
    """While Python imports torch (seconds): no traceback, the contract's code and line, nothing written.

    The delays stay inside start-up: the whole run takes about 1.1 s on an idle 2-core machine,
    and a signal after it rightly changes nothing.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "onorm_launch", "convert", MLP, "--arch", MLP_ARCH, "--input-shape", "2,64", "-o", tmp_path / "out.pt"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    wait_until_it_catches(process, signal.SIGTERM)  # Python itself catches SIGINT from its start
    time.sleep(delay)
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    expected = {
        signal.SIGINT: (130, "interrupted; nothing was written"),
        signal.SIGTERM: (143, "terminated (SIGTERM); no partial output was left"),
    }
    assert (process.returncode, stderr.strip().splitlines()) == (
        expected[signum][0],
        [f"onorm convert: error: {expected[signum][1]}"],
    )
    assert list(tmp_path.iterdir()) == []


def signal_once_after(monkeypatch, target: str, signum: int, swallow: bool = False) -> None:
    """Patch ``target`` to send ``signum`` to this process once it returned (``swallow``: and catch the interrupt as a library might)."""
    module, _, name = target.rpartition(".")
    real = getattr(sys.modules[module], name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        try:
            os.kill(os.getpid(), signum)  # delivered to the handler cli_main installed
        except KeyboardInterrupt:
            if not swallow:
                raise
        return result

    monkeypatch.setattr(target, wrapper)


def test_a_signal_after_the_report_cannot_change_the_exit_code(monkeypatch, capsys):
    signal_once_after(monkeypatch, "typer.echo", signal.SIGTERM)
    assert cli_main(["inspect", str(MLP), "--arch", MLP_ARCH, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["exit_code"] == 0 and "error" not in err


def test_a_stop_raised_as_the_signals_are_held_does_not_leave_them_blocked(monkeypatch):
    """Python runs a handler between statements: one that raises just after the block must still unblock them."""
    from onorm_convert import files

    real = signal.pthread_sigmask

    def block_then_interrupt(how, mask):
        previous = real(how, mask)
        if how == signal.SIG_BLOCK and mask:
            raise KeyboardInterrupt  # as a handler would, at the first statement boundary after the call
        return previous

    before = real(signal.SIG_BLOCK, ())
    monkeypatch.setattr(signal, "pthread_sigmask", block_then_interrupt)
    with pytest.raises(KeyboardInterrupt), files.stop_signals_held():
        pytest.fail("the body must not run")
    monkeypatch.setattr(signal, "pthread_sigmask", real)
    assert real(signal.SIG_BLOCK, ()) == before  # no stop signal left blocked (nor inherited by child processes)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT handled as in a terminal (test workers may ignore it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_after_the_output_was_published_finishes_the_run(tmp_path, monkeypatch, capsys, ctrl_c_raises):
    """The published file is complete: the run reports it (exit 0), it does not claim that nothing was written."""
    signal_once_after(monkeypatch, "onorm_convert.files.publish", signal.SIGINT)
    assert cli_main(["convert", str(MLP), "--arch", MLP_ARCH, "-o", str(tmp_path / "out.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] and (tmp_path / "out.pt").is_file()


def test_ctrl_c_that_a_library_caught_still_stops_the_run_before_publishing(
    tmp_path, monkeypatch, capsys, ctrl_c_raises
):
    signal_once_after(monkeypatch, "onorm_convert.cli.convert_cmd.make_checkpoint", signal.SIGINT, swallow=True)
    assert (
        cli_main(["convert", str(MLP), "--arch", MLP_ARCH, "-o", str(tmp_path / "out.pt")]) == errors.EXIT_INTERRUPTED
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == "onorm convert: error: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
@pytest.mark.slow
def test_other_terminating_signals_unwind_like_sigterm(tmp_path, signum):
    out = tmp_path / "mlp.onnx"
    out.write_bytes(b"the previous release")
    process = start("export", MLP, "--arch", MLP_ARCH, "--input-shape", "1,64", "-o", out, "--force")
    code, stderr = signal_after(process, "verifying against the PyTorch model", signum)
    name = signal.Signals(signum).name
    assert code == errors.EXIT_TERMINATED and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"onorm export: error: terminated ({name}); no partial output was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"] and out.read_bytes() == b"the previous release"


# --- a stdout that fails -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_stdout_says_the_report_is_lost_and_that_the_output_was_published(tmp_path):
    out = tmp_path / "out.pt"
    with open("/dev/full", "w") as full:
        done = run_cli(
            "convert", MLP, "--arch", MLP_ARCH, "-o", out, "--json", cwd=REPO, stdout=full, stderr=subprocess.PIPE
        )
    assert done.returncode == 2 and out.is_file() and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"onorm convert: error: cannot write to stdout (No space left on device); the report is lost, {out} was published"
    )


@pytest.mark.slow
def test_a_closed_pipe_says_that_nothing_was_written(tmp_path):
    out = tmp_path / "out.pt"
    read, write = os.pipe()
    os.close(read)  # `| true`: the reader is gone before onorm prints its table
    try:
        done = run_cli("convert", MLP, "--arch", MLP_ARCH, "-o", out, cwd=REPO, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert done.returncode == 2 and not out.exists() and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == "onorm convert: error: cannot write to stdout (Broken pipe); the report is lost, nothing was written"
    )


# --- values that should be refused ------------------------------------------------------------------------


def mlp_state_with(tmp_path: Path, name: str, value: float) -> Path:
    state = torch.load(MLP, weights_only=True)
    state[name].view(-1)[0] = value
    torch.save(state, tmp_path / "damaged.pt")
    return tmp_path / "damaged.pt"


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("0.weight", float("nan"), "contains NaN or Inf"),
        ("1.running_var", -1.0, "is negative, which a variance cannot be"),
    ],
)
def test_convert_without_an_input_shape_refuses_damaged_values(tmp_path, name, value, problem):
    path = mlp_state_with(tmp_path, name, value)
    before = digests(tmp_path)
    result = onorm("convert", path, "--arch", MLP_ARCH, "-o", tmp_path / "out.pt", "--json")
    assert_json_failure(result, "convert", 2, "BadInputError", f"'{name}' {problem}; the model is damaged")
    assert digests(tmp_path) == before


def test_export_without_verification_refuses_a_nan_model(tmp_path):
    path = mlp_state_with(tmp_path, "3.bias", float("inf"))
    before = digests(tmp_path)
    result = onorm(
        "export", path, "--arch", MLP_ARCH, "--input-shape", "1,64", "--no-verify", "-o", tmp_path / "m.onnx", "--json"
    )
    assert_json_failure(
        result,
        "export",
        2,
        "BadInputError",
        "'3.bias' contains NaN or Inf; the model is damaged, retrain or fix it before exporting",
    )
    assert digests(tmp_path) == before


def test_complex_weights_are_refused_not_made_real():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=torch.complex64), torch.nn.BatchNorm1d(3))
    with pytest.raises(
        BadInputError, match=r"'0.weight' is complex \(torch.complex64\); onorm takes real-valued models only"
    ):
        convert(model)


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("factory, returned", [("returns_none", "NoneType"), ("returns_an_int", "int")])
def test_a_model_with_no_tensor_output_is_bad_input_not_a_mismatch(tmp_path, user_code, command, factory, returned):
    result = onorm(
        command, "net.pt", "--arch", f"{user_code}:{factory}", "--input-shape", "2,64", "-o", "out.bin", "--json"
    )
    assert_json_failure(result, command, 2, "BadInputError", f"returns no tensor (it returned {returned})")
    assert not (tmp_path / "out.bin").exists()


# --- names --------------------------------------------------------------------------------------------------


def test_a_legal_long_output_name_is_written(tmp_path):
    out = tmp_path / ("m" * 250 + ".pt")
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_newline_in_the_output_name_does_not_cut_the_error_line(tmp_path):
    out = tmp_path / "two\nlines.pt"
    out.write_bytes(b"old")
    result = onorm("convert", MLP, "--arch", MLP_ARCH, "-o", out)
    assert result.exit_code == 2
    assert_one_error_line(result, "convert", f"{str(out)!r}: already exists; pass --force to replace it")


def test_a_link_swapped_in_for_the_temp_file_is_neither_followed_nor_published(tmp_path):
    from onorm_convert.errors import BadInputError
    from onorm_convert.files import publish

    private = tmp_path / "private"
    private.write_text("secret")
    private.chmod(0o600)
    staged, destination = tmp_path / ".out.pt.tmp", tmp_path / "out.pt"
    staged.symlink_to(private)  # what someone who can write the folder could swap in
    with pytest.raises((BadInputError, OSError)):
        publish(staged, destination, replace=False)
    assert not destination.exists() and not destination.is_symlink()
    assert (private.stat().st_mode & 0o777) == 0o600


def test_a_signal_while_the_commands_are_being_built_is_still_the_contract(monkeypatch, capsys, ctrl_c_raises):
    """Before the command runs, with the handlers in place (a rare exit by SIGINT at start-up came from here)."""
    signal_once_after(monkeypatch, "typer.main.get_command", signal.SIGINT)
    assert cli_main(["inspect", str(MLP), "--arch", MLP_ARCH]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["onorm inspect: error: interrupted; nothing was written"]
