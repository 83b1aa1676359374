"""Write the held-out digits of the fixed split as one model's input array (.npy).

    python sample_models/test_inputs.py digits_resnet build/demo/digits_test.npy

Real inputs for ``onorm export --inputs`` (verification and the clamp audit). Needs
scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `sample_models` importable

from sample_models import models  # noqa: E402
from sample_models.train import load_digits_split  # noqa: E402


def main(name: str, path: str) -> None:
    _, _, x_test, _ = load_digits_split()
    array = models.shape_digits(name, x_test).numpy().astype(np.float32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    print(f"{array.shape[0]} held-out digits shaped {array.shape[1:]} -> {path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
