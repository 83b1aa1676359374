"""After training a converted model: the optimizer keeps working, and the trained model reaches `onorm export`.

Two documented routes out of a training loop: ``onorm_convert.save_checkpoint(model, path,
arch=...)`` (self-describing, exact), and a plain ``torch.save(model.state_dict())`` with the
BatchNorm original's ``--arch`` (rebuilt with the default options, which it says).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import onorm_convert as oc
from onorm_convert.checkpoint import conversion_of
from onorm_convert.errors import BadInputError
from onorm_convert.layers import STATE_BUFFERS
from onorm_convert.load import LoadWarning, read_model

from conftest import RESNET, RESNET_ARCH, onorm

pytestmark = pytest.mark.usefixtures("in_repo")


def trained_resnet() -> nn.Module:
    from sample_models import models

    model = models.digits_resnet()
    model.load_state_dict(torch.load(RESNET, weights_only=True))
    return model


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, batch: int = 8) -> None:
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 1, 8, 8, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same parameters and all four streaming buffers, and the same eval outputs."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_convert_inplace_keeps_the_optimizer_and_its_state_working():
    model = trained_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_steps(model, optimizer, steps=1)  # momentum buffers exist, keyed by the Parameter objects
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    bn_weights = {name: model.get_submodule(name).weight for name in norms}
    oc.convert(model, inplace=True)
    assert norms and all(isinstance(model.get_submodule(name), oc.OnlineNorm2d) for name in norms)
    assert all(model.get_submodule(name).weight is bn_weights[name] for name in norms)
    before = {name: p.detach().clone() for name, p in bn_weights.items()}
    train_steps(model, optimizer, steps=2)
    assert all(not torch.equal(before[name], p) for name, p in bn_weights.items()), (
        "the optimizer did not move the OnlineNorm weights"
    )
    assert all("momentum_buffer" in optimizer.state[p] for p in bn_weights.values())


def test_convert_as_a_copy_has_new_parameters_that_an_earlier_optimizer_does_not_hold():
    model = trained_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    converted = oc.convert(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(
        id(p) in held for p in converted.parameters()
    )  # hence the documented rule: build it after converting


@pytest.mark.slow
def test_save_checkpoint_after_training_is_exact_and_export_takes_it_without_flags(tmp_path):
    model = oc.convert(trained_resnet(), inplace=True, alpha_fwd=0.99, alpha_bkw=0.9)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    oc.save_checkpoint(model, tmp_path / "tuned.pt", arch=RESNET_ARCH, input_shapes=[(1, 1, 8, 8)])
    loaded = read_model(tmp_path / "tuned.pt")
    assert loaded.info["conversion"]["alpha_fwd"] == 0.99 and loaded.info["code_consent"] == "signature"
    assert_same_model(model, loaded.module)
    result = onorm("export", str(tmp_path / "tuned.pt"), "--strip-clamp", "-o", str(tmp_path / "tuned.onnx"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tuned.onnx").is_file()


@pytest.mark.slow
def test_a_plain_state_dict_of_a_converted_model_loads_with_the_original_arch_and_says_it_used_the_defaults(tmp_path):
    model = oc.convert(trained_resnet(), inplace=True)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.01))
    torch.save(model.state_dict(), tmp_path / "tuned_sd.pt")
    with pytest.warns(
        LoadWarning,
        match="records no conversion options, so its .* OnlineNorm layers were rebuilt with the defaults .*save_checkpoint",
    ):
        loaded = read_model(tmp_path / "tuned_sd.pt", arch=RESNET_ARCH)
    assert_same_model(model, loaded.module)
    assert {name for name, m in loaded.module.named_modules() if isinstance(m, oc.OnlineNormBase)} == {
        name for name, m in model.named_modules() if isinstance(m, oc.OnlineNormBase)
    }
    result = onorm(
        "export", tmp_path / "tuned_sd.pt", "--arch", RESNET_ARCH, "--input-shape", "1,1,8,8", "-o", tmp_path / "t.onnx"
    )
    assert result.exit_code == 0, result.output
    assert "onorm: warning:" in result.stderr and "rebuilt with the defaults" in result.stderr


def test_a_partly_converted_model_round_trips_with_its_batchnorms_kept(tmp_path):
    norms = [name for name, m in trained_resnet().named_modules() if isinstance(m, nn.BatchNorm2d)]
    model = oc.convert(trained_resnet(), exclude=norms[:1])
    kinds = {name: type(model.get_submodule(name)).__name__ for name in norms}
    assert "BatchNorm2d" in kinds.values() and "OnlineNorm2d" in kinds.values()
    oc.save_checkpoint(model, tmp_path / "part.pt", arch=RESNET_ARCH)
    loaded = read_model(tmp_path / "part.pt").module
    assert {name: type(loaded.get_submodule(name)).__name__ for name in norms} == kinds
    assert all(
        name in loaded.state_dict() for name, _ in model.named_buffers() if name.rpartition(".")[2] in STATE_BUFFERS
    )


def test_layers_with_different_options_come_back_with_their_own(tmp_path):
    model = oc.convert(trained_resnet())
    layers = [m for m in model.modules() if isinstance(m, oc.OnlineNormBase)]
    layers[0].alpha_fwd, layers[-1].ecm = 0.5, "none"
    assert conversion_of(model) == {}  # no one set of options to record
    oc.save_checkpoint(model, tmp_path / "mixed.pt", arch=RESNET_ARCH)
    loaded = [m for m in read_model(tmp_path / "mixed.pt").module.modules() if isinstance(m, oc.OnlineNormBase)]
    assert [(m.alpha_fwd, m.ecm) for m in loaded] == [(m.alpha_fwd, m.ecm) for m in layers]


def test_an_arch_that_is_not_a_code_name_is_refused_when_saving(tmp_path):
    with pytest.raises(BadInputError, match="expected package.module:factory"):
        oc.save_checkpoint(oc.convert(trained_resnet()), tmp_path / "x.pt", arch="digits_resnet")
    assert not (tmp_path / "x.pt").exists()
