"""Does a converted model train as well as its BatchNorm original? scikit-learn's digits, on CPU.

A small residual CNN with BatchNorm2d, and the same initial weights converted by the real
``onorm convert`` CLI to OnlineNorm with activation clamping and with layer scaling, are
trained with the same seeds, data order, optimizer and schedule at batch 32, 2 and 1. The
table reports each run's best validation loss and accuracy (rows BN / ON (clamp) / ON
(layer scaling), as in the Online Normalization paper). Then ``onorm export --strip-clamp``
exports the trained ON (clamp) model with the validation set as ``--inputs``, and the ONNX
model's validation accuracy under onnxruntime is compared with PyTorch's.

    python benchmarks/train_digits.py [--epochs 10] [--threads 1] [--out benchmarks/results]

Writes ``train_digits.json``, ``train_digits.md`` (the table) and ``train_digits.png``
(validation accuracy per epoch; needs matplotlib: ``pip install .[plots]``). The digits come
with scikit-learn (in the ``dev`` extra); nothing is downloaded.

Targets (issue 5): ON (clamp) within 1 point of BN's validation accuracy at batch 32; ON at
batch 1 within 2 points of BN at batch 32; the stripped ONNX model's accuracy identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onorm_convert.checkpoint import make_checkpoint, write_checkpoint
from onorm_convert.load import LoadedModel, read_model
from onorm_convert.shared import strip_clamps

from common import RESULTS_DIR, BasicBlock, environment, write_json, write_text

BENCHMARKS_DIR = Path(__file__).resolve().parent
ARCH = "train_digits:digits_resnet"  # importable by the onorm CLI run with cwd=BENCHMARKS_DIR
VARIANTS = {
    "BN": None,
    "ON (clamp)": "clamp",
    "ON (layer scaling)": "layer_scaling",
}  # label -> --ecm (None: BatchNorm)
BATCH_SIZES = (32, 2, 1)
REFERENCE_BATCH = 32  # the batch size whose BN accuracy the targets are measured against
VAL_FRACTION, SPLIT_SEED = 0.2, 0  # the fixed train/validation split


@dataclass(frozen=True)
class Recipe:
    """The training recipe every run shares: SGD with momentum, cosine decay per step."""

    epochs: int = 10
    lr_at_batch_32: float = 0.1  # scaled linearly with the batch size, the same rule for every variant
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    alpha_fwd: float = 0.999  # OnlineNorm's statistics decay, given to `onorm convert --alpha-fwd`

    def learning_rate(self, batch: int) -> float:
        """The linearly scaled learning rate for ``batch`` samples per step."""
        return self.lr_at_batch_32 * batch / 32


@dataclass
class DigitsSplit:
    """The fixed train/validation split: images ``(N, 1, 8, 8)`` standardized with the training set's statistics."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor


def load_digits_split(limit: tuple[int, int] | None = None) -> DigitsSplit:
    """scikit-learn's 1797 digits, split stratified by class with a fixed seed.

    ``limit=(n_train, n_val)`` keeps only the first samples of each part (for quick checks).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), pixel values 0..16
    train_x, val_x, train_y, val_y = train_test_split(
        images, digits.target, test_size=VAL_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    if limit is not None:
        train_x, train_y, val_x, val_y = train_x[: limit[0]], train_y[: limit[0]], val_x[: limit[1]], val_y[: limit[1]]
    mean, std = train_x.mean(), train_x.std()
    return DigitsSplit(
        torch.from_numpy((train_x - mean) / std),
        torch.from_numpy(train_y).long(),
        torch.from_numpy((val_x - mean) / std),
        torch.from_numpy(val_y).long(),
    )


def digits_resnet(width: int = 16) -> nn.Module:
    """Residual CNN for ``(N, 1, 8, 8)`` digits: stem, a block at 8x8, a block at 4x4, pooling, linear (10 classes)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def onorm_cli(*calls: Sequence[str | Path]) -> list[subprocess.CompletedProcess]:
    """Run real ``onorm`` command lines (``python -m onorm_convert``) side by side, from this folder so ``ARCH`` imports.

    Each of ``calls`` is one command's arguments; a failing command raises RuntimeError with its stderr.
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "onorm_convert", *map(str, args)],
            cwd=BENCHMARKS_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for args in calls
    ]
    done = []
    for args, process in zip(calls, processes):
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"onorm {args[0]} failed (exit {process.returncode}): {stderr.strip()}")
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


def initial_models(work_dir: Path, recipe: Recipe) -> dict[str, nn.Module]:
    """The seeded BatchNorm model, and ``onorm convert`` of its saved weights for each ECM; label -> module."""
    torch.manual_seed(recipe.seed)
    original = digits_resnet()
    weights = work_dir / "bn_initial.pt"
    torch.save(original.state_dict(), weights)
    converted = {label: work_dir / f"on_{ecm}_initial.pt" for label, ecm in VARIANTS.items() if ecm is not None}
    onorm_cli(*(
        ("convert", weights, "--arch", ARCH, "--ecm", VARIANTS[label], "--alpha-fwd", recipe.alpha_fwd, "-o", path,
         "--input-shape", "1,1,8,8")
        for label, path in converted.items()
    ))  # fmt: skip
    return {"BN": original, **{label: read_model(path).module for label, path in converted.items()}}


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Eval-mode ``(mean cross-entropy, accuracy in percent)`` on ``x``, ``y``."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).float().mean().item()


def train(model: nn.Module, split: DigitsSplit, batch: int, recipe: Recipe) -> dict[str, Any]:
    """Train ``model`` in place; per-epoch validation loss and accuracy, best values, and any failure.

    Every run draws the same shuffles (a generator seeded with ``recipe.seed``) and drops
    the last incomplete batch, so every step sees exactly ``batch`` samples. A step that
    raises (BatchNorm refusing the batch) or a non-finite loss ends the run; ``error``
    says which.
    """
    torch.manual_seed(recipe.seed)
    shuffle = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = len(split.train_y) // batch
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.learning_rate(batch), momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    error = None
    start = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(split.train_y), generator=shuffle)
        losses = []
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            try:
                loss = F.cross_entropy(model(split.train_x[index]), split.train_y[index])
            except ValueError as err:
                error = f"epoch {epoch} step {step + 1}: {type(err).__name__}: {err}"
                break
            if not math.isfinite(loss.item()):
                error = f"epoch {epoch} step {step + 1}: training loss became {loss.item()}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if error is not None:
            break
        val_loss, val_acc = evaluate(model, split.val_x, split.val_y)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_acc": val_acc})
    return {
        "batch": batch,
        "learning_rate": recipe.learning_rate(batch),
        "history": history,
        "best_val_loss": min((h["val_loss"] for h in history), default=None),
        "best_val_acc": max((h["val_acc"] for h in history), default=None),
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "error": error,
        "seconds": time.perf_counter() - start,
    }


def dense_batchnorm_at_batch_1() -> str:
    """What ``BatchNorm1d`` does in training mode on one dense sample (measured, not assumed)."""
    try:
        nn.BatchNorm1d(4).train()(torch.zeros(1, 4))
    except ValueError as err:
        return f"raises ValueError: {err}"
    return "runs without error"


def export_stripped(model: nn.Module, source: LoadedModel, split: DigitsSplit, work_dir: Path) -> dict[str, Any]:
    """``onorm export --strip-clamp`` of the trained ON (clamp) ``model``, validation set as ``--inputs``.

    ``source`` is what the model was converted as: its arch and conversion options turn the
    trained weights into an onorm checkpoint. Returns the validation accuracy of the ONNX
    model (onnxruntime), of the PyTorch model as trained (eval mode, clamp kept) and with
    its clamps stripped, how many ONNX predictions differ from the trained model's, the
    largest logit difference, and the export's clamp audit.
    """
    import onnxruntime as ort

    checkpoint = work_dir / "on_clamp_trained.pt"
    write_checkpoint(
        checkpoint,
        make_checkpoint(
            model, arch=source.arch, arch_kwargs=source.arch_kwargs, conversion=source.info["conversion"],
            input_shapes=source.input_shapes,
        ),
    )  # fmt: skip
    inputs = work_dir / "val_inputs.npy"
    np.save(inputs, split.val_x.numpy())
    onnx_path = work_dir / "on_clamp_stripped.onnx"
    [done] = onorm_cli(("export", checkpoint, "-o", onnx_path, "--strip-clamp", "--inputs", inputs, "--json"))
    report = json.loads(done.stdout)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: split.val_x.numpy()})[0])
    model.eval()
    with torch.no_grad():
        torch_logits = model(split.val_x)
        stripped_logits = strip_clamps(model)(split.val_x)
    return {
        "onnx_val_acc": accuracy(onnx_logits, split.val_y),
        "pytorch_val_acc": accuracy(torch_logits, split.val_y),
        "pytorch_stripped_val_acc": accuracy(stripped_logits, split.val_y),
        "predictions_differing": int((onnx_logits.argmax(1) != torch_logits.argmax(1)).sum()),
        "max_abs_logit_difference": float((onnx_logits - torch_logits).abs().max()),
        "clamp_audit": report.pop("clamp_audit"),
        "export_report": report,
    }


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percentage of rows whose largest logit is at the label."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def run_experiment(
    recipe: Recipe, work_dir: Path, batch_sizes: tuple[int, ...] = BATCH_SIZES, limit: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Every variant at every batch size from the same initial weights, then the stripped export; all results."""
    split = load_digits_split(limit=limit)
    initial = initial_models(work_dir, recipe)
    runs = []
    trained = {}
    for batch in batch_sizes:
        for label, ecm in VARIANTS.items():
            model = copy.deepcopy(initial[label])
            result = {"variant": label, "ecm": ecm, **train(model, split, batch, recipe)}
            runs.append(result)
            trained[label, batch] = model
            print(f"  batch {batch:>2} {label:<19} best val loss {_fmt(result['best_val_loss'], '.4f')}  "
                  f"best val acc {_fmt(result['best_val_acc'], '.2f')}%  ({result['seconds']:.0f} s)"
                  + (f"  FAILED: {result['error']}" if result["error"] else ""), flush=True)  # fmt: skip
    results = {
        "environment": environment(),
        "recipe": asdict(recipe),
        "split": {
            "train": len(split.train_y),
            "val": len(split.val_y),
            "val_fraction": VAL_FRACTION,
            "seed": SPLIT_SEED,
        },
        "runs": runs,
        "dense_batchnorm_at_batch_1": dense_batchnorm_at_batch_1(),
    }
    export_batch = REFERENCE_BATCH if REFERENCE_BATCH in batch_sizes else batch_sizes[0]
    source = read_model(work_dir / "on_clamp_initial.pt")
    results["export"] = {
        "batch": export_batch,
        **export_stripped(trained["ON (clamp)", export_batch], source, split, work_dir),
    }
    results["targets"] = check_targets(runs, results["export"])
    return results


def check_targets(runs: list[dict[str, Any]], export: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets, each with the measured value and whether it is met."""
    best = {(r["variant"], r["batch"]): r["best_val_acc"] for r in runs}
    reference = best.get(("BN", REFERENCE_BATCH))
    targets = []
    if reference is not None:
        clamp_gap = reference - (best.get(("ON (clamp)", REFERENCE_BATCH)) or 0.0)
        targets.append(
            {"target": "ON (clamp) within 1 point of BN at batch 32", "gap_points": clamp_gap, "met": clamp_gap <= 1.0}
        )
        for label in ("ON (clamp)", "ON (layer scaling)"):
            if (label, 1) in best:
                gap = reference - (best[label, 1] or 0.0)
                targets.append(
                    {
                        "target": f"{label} at batch 1 within 2 points of BN at batch 32",
                        "gap_points": gap,
                        "met": gap <= 2.0,
                    }
                )
    same = export["onnx_val_acc"] == export["pytorch_val_acc"]
    targets.append(
        {
            "target": "stripped ONNX accuracy identical to the trained PyTorch model's (clamps kept)",
            "gap_points": export["pytorch_val_acc"] - export["onnx_val_acc"],
            "met": same,
        }
    )
    return targets


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(results: dict[str, Any]) -> str:
    """The paper-style table (rows BN / ON (clamp) / ON (layer scaling); best val loss and accuracy per batch size)."""
    batches = list(dict.fromkeys(r["batch"] for r in results["runs"]))
    cells = {(r["variant"], r["batch"]): r for r in results["runs"]}
    header = (
        "| Normalization | " + " | ".join(f"batch {b}: best val loss | batch {b}: best val acc" for b in batches) + " |"
    )
    lines = [header, "|---|" + "---:|---:|" * len(batches)]
    for label in VARIANTS:
        row = []
        for batch in batches:
            run = cells[label, batch]
            failed = " (failed)" if run["error"] else ""
            row += [_fmt(run["best_val_loss"], ".3f") + failed, _fmt(run["best_val_acc"], ".2f") + "%" + failed]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    export, split, recipe = results["export"], results["split"], results["recipe"]
    lines += [
        "",
        f"Digits: {split['train']} training / {split['val']} validation images, {recipe['epochs']} epochs, SGD momentum "
        f"{recipe['momentum']}, weight decay {recipe['weight_decay']}, learning rate {recipe['lr_at_batch_32']} x batch/32 "
        f"with cosine decay per step, OnlineNorm alpha_fwd {recipe['alpha_fwd']}; the same initial weights and data order "
        "for every run. Best values over the epochs.",
        "",
        batchnorm_at_batch_1(cells["BN", 1]) if ("BN", 1) in cells else "",
        f"Dense BatchNorm1d at batch 1 in training mode {results['dense_batchnorm_at_batch_1']}.",
        "",
        f"Stripped ONNX export of ON (clamp) at batch {export['batch']} (`onorm export --strip-clamp`): validation accuracy "
        f"{export['onnx_val_acc']:.2f}% under onnxruntime, {export['pytorch_stripped_val_acc']:.2f}% in PyTorch with the "
        f"clamps stripped, {export['pytorch_val_acc']:.2f}% in PyTorch as trained (clamps kept); "
        f"{export['predictions_differing']} of {split['val']} predictions differ from the trained model's; max |logit "
        f"difference| {export['max_abs_logit_difference']:.3g} (the clamp audit's output change: "
        f"{export['clamp_audit']['max_output_change']:.3g}).",
        "",
        "Targets:",
        "",
    ]
    lines += [
        f"- {t['target']}: gap {t['gap_points']:+.2f} points — {'met' if t['met'] else 'MISSED'}"
        for t in results["targets"]
    ]
    return "\n".join(lines) + "\n"


def batchnorm_at_batch_1(run: dict[str, Any]) -> str:
    """One sentence on what BatchNorm did when trained at batch 1, from the run's outcome."""
    if run["error"]:
        return f"BatchNorm at batch 1 could not train: {run['error']}."
    return (
        "BatchNorm at batch 1 runs in this CNN (its BatchNorm2d layers see 8x8 or 4x4 positions per channel): in training "
        "it normalizes each sample by that sample's own statistics (instance normalization), while evaluation uses the "
        f"running averages of those statistics; best validation accuracy {run['best_val_acc']:.2f}%."
    )


def plot_curves(results: dict[str, Any], path: Path) -> bool:
    """Validation accuracy per epoch, one panel per batch size, one line per variant; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batches = list(dict.fromkeys(r["batch"] for r in results["runs"]))
    figure, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), sharey=True, squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for run in (r for r in results["runs"] if r["batch"] == batch):
            epochs = [h["epoch"] for h in run["history"]]
            axis.plot(epochs, [h["val_acc"] for h in run["history"]], marker=".", label=run["variant"])
        axis.set_title(f"batch {batch}")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][0].legend(loc="lower right")
    figure.suptitle("Digits residual CNN: BatchNorm vs Online Normalization")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    # One thread: 8x8 activations gain nothing from intra-op threads, and idle threads spinning on a shared
    # 2-core machine cost several times the step.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for train_digits.{json,md,png}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=args.epochs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {recipe}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        results = run_experiment(recipe, Path(work))
    table = markdown_table(results)
    print("\n" + table)
    print("Clamp audit of the stripped export:")
    print(json.dumps(results["export"]["clamp_audit"], indent=2))
    write_json(args.out / "train_digits.json", results)
    write_text(args.out / "train_digits.md", table)
    if plot_curves(results, args.out / "train_digits.png"):
        print(f"wrote {args.out / 'train_digits.png'}")
    else:
        print("matplotlib is not installed (pip install .[plots]); skipped train_digits.png")
    print(f"wrote {args.out / 'train_digits.json'} and {args.out / 'train_digits.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
