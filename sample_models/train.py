"""Regenerate ``sample_models/<factory>.pt``: train each sample model a few seconds on scikit-learn's digits.

Run from the repository root: ``python sample_models/train.py``. Prints each model's
held-out accuracy. Needs scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: make `sample_models` importable

from sample_models import models  # noqa: E402

EPOCHS = 15
BATCH = 64
SEED = 0


def load_digits_split(seed: int = SEED) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as (N, 8, 8) images in [0, 1]; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


def train(name: str, seed: int = SEED) -> tuple[nn.Module, float]:
    """Train ``models.<name>()`` with Adam; returns the model (eval mode) and its test accuracy."""
    torch.manual_seed(seed)
    model = getattr(models, name)()
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    x_train, x_test = models.shape_digits(name, x_train), models.shape_digits(name, x_test)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(y_train)).split(BATCH):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def main() -> None:
    for name in models.INPUT_SHAPES:
        model, accuracy = train(name)
        path = HERE / f"{name}.pt"
        torch.save(model.state_dict(), path)
        print(f"{name}: test accuracy {accuracy:.3f}, {path.stat().st_size / 1024:.0f} KiB -> {path.name}")


if __name__ == "__main__":
    main()
