"""Models whose weights pass torch's external-data threshold: a self-contained pair NAME.onnx + NAME.onnx.data.

The threshold (1.5 GiB) is lowered to 0 here, so every export keeps its weights apart.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from test_export import Liar, trained_sample

from onorm_convert import convert, export, export_onnx
from onorm_convert.errors import BadInputError
from onorm_convert.export import ExportMismatchError

pytestmark = pytest.mark.slow  # each case exports and verifies an ONNX model


@pytest.fixture(autouse=True)
def weights_always_apart(monkeypatch):
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)


def locations(model_path) -> set[str]:
    proto = onnx.load(str(model_path), load_external_data=False)
    return {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}


def run(model_path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_the_pair_is_published_self_contained_and_works_where_it_is_copied(tmp_path):
    model = convert(trained_sample("digits_mlp"))
    x = torch.randn(3, 64)
    report = export_onnx(model, tmp_path / "m.onnx", x, strip_clamp=True)
    assert report.verification.passed and report.data_path == str(tmp_path / "m.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no hidden temp files left
    assert locations(tmp_path / "m.onnx") == {"m.onnx.data"}
    elsewhere = tmp_path / "copied"
    elsewhere.mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        shutil.copy(tmp_path / name, elsewhere / name)
    np.testing.assert_allclose(run(elsewhere / "m.onnx", x), run(tmp_path / "m.onnx", x), rtol=0, atol=0)


def test_an_old_data_file_is_replaced_with_force_never_appended_to(tmp_path):
    model = convert(trained_sample("digits_mlp"))
    (tmp_path / "fresh").mkdir()
    export_onnx(model, tmp_path / "fresh" / "m.onnx", torch.randn(2, 64))
    (tmp_path / "m.onnx.data").write_bytes(b"old" * 100_000)
    with pytest.raises(BadInputError, match="m.onnx.data"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64), replace=False)
    assert not (tmp_path / "m.onnx").exists() and (tmp_path / "m.onnx.data").read_bytes()[:3] == b"old"
    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64), replace=True)
    assert (tmp_path / "m.onnx.data").read_bytes() == (tmp_path / "fresh" / "m.onnx.data").read_bytes()


def test_a_kept_failed_pair_refers_to_its_own_data(tmp_path):
    with pytest.raises(ExportMismatchError):
        export_onnx(Liar(), tmp_path / "liar.onnx", torch.randn(2, 3, 6, 6), keep_failed=True)
    kept = tmp_path / "liar.verification-failed.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name, kept.name + ".data"]
    assert locations(kept) == {kept.name + ".data"}
    assert run(kept, torch.randn(2, 3, 6, 6)).shape == (2, 4, 4, 4)
