"""The last step of ``make demo``: what was written, and whether any model decides differently.

    python sample_models/demo_summary.py build/demo

Runs the BatchNorm original (``sample_models/digits_resnet.pt``), the converted checkpoint
and the exported ONNX file on the held-out digits the demo wrote, and prints each one's
accuracy, how many predictions differ from the original's, and what the export's warning
about the stripped clamp amounts to. Needs scikit-learn (the ``dev`` extra) for the labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: make `sample_models` and `onorm_convert` importable

from sample_models import models  # noqa: E402
from sample_models.train import load_digits_split  # noqa: E402

NAME = "digits_resnet"
DEMO_FILES = {  # what each file `make demo` writes is
    "digits_test.npy": "the held-out digits, the --inputs of convert and export",
    f"{NAME}_onorm.pt": "the converted model (OnlineNorm), a checkpoint onorm export and oc.load_model read",
    f"{NAME}.onnx": "the exported model: folded, clamp stripped, verified with onnxruntime",
}


def original_logits(inputs: np.ndarray) -> np.ndarray:
    """The shipped BatchNorm model's logits on ``inputs``."""
    model = getattr(models, NAME)()
    model.load_state_dict(torch.load(HERE / f"{NAME}.pt", weights_only=True))
    return torch_logits(model, inputs)


def torch_logits(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """``model``'s logits on ``inputs``, in eval mode."""
    with torch.no_grad():
        return model.eval()(torch.from_numpy(inputs)).numpy()


def onnx_logits(path: Path, inputs: np.ndarray) -> np.ndarray:
    """The ONNX file's logits on ``inputs``, with onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def summary_lines(logits: dict[str, np.ndarray], labels: np.ndarray) -> list[str]:
    """Accuracy per model, the predictions differing from the first model's, and the largest change of the last.

    ``logits`` maps each model's description to its ``(N, classes)`` logits, the original first.
    """
    (original_name, original), *others = logits.items()
    reference = original.argmax(axis=1)
    lines = [f"accuracy on the {len(labels)} held-out digits:"]
    width = max(map(len, logits))
    lines += [f"  {name:<{width}}  {np.mean(values.argmax(axis=1) == labels):.2%}" for name, values in logits.items()]
    lines += [
        f"predictions that differ from the {original_name}'s: "
        + ", ".join(f"{name} {int((values.argmax(axis=1) != reference).sum())}" for name, values in others)
        + f" (of {len(labels)})"
    ]
    return lines


def clamp_note(converted: np.ndarray, exported: np.ndarray) -> list[str]:
    """What the figures in convert's check and the export's warning about the stripped clamp mean on these digits."""
    changed = int((converted.argmax(axis=1) != exported.argmax(axis=1)).sum())
    largest = float(np.abs(converted.astype(np.float64) - exported).max(initial=0.0))
    return [
        f"the export's 'onorm: warning:' line: stripping the clamp moves the logits by at most {largest:.3g}",
        f"  on these digits and changes {changed} predictions of the converted model;",
        "convert's 'max |difference|' is on one random input, where the clamp (which BatchNorm lacks) cuts far more.",
    ]


def main(folder: Path) -> None:
    from onorm_convert import load_model

    print(f"\ndemo summary: files written in {folder}/")
    for name, what in DEMO_FILES.items():
        print(f"  {name:<24} {(folder / name).stat().st_size / 1024:6.0f} KiB  {what}")
    inputs = np.load(folder / "digits_test.npy")
    labels = load_digits_split()[3].numpy()[: len(inputs)]  # the file holds the held-out digits in order
    converted = torch_logits(load_model(folder / f"{NAME}_onorm.pt"), inputs)
    exported = onnx_logits(folder / f"{NAME}.onnx", inputs)
    logits = {"BatchNorm original": original_logits(inputs), "converted": converted, "exported ONNX": exported}
    for line in summary_lines(logits, labels) + clamp_note(converted, exported):
        print(line)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]))
