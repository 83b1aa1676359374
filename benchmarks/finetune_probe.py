"""Why does a converted model fail to fine-tune? Layer-by-layer measurements for docs/finetune.md.

Issue 10's failing model (``finetune.strided_resnet``, pretrained as in ``finetune.py``) is
converted and fine-tuned with its recipe while hooks on every OnlineNorm record, per step:

- ``second_moment``: mean over the batch of mean(y^2), y from the statistics before the batch
  (1 when the running statistics track the activations; the batch's drift within 32 samples
  is ignored), the median and the largest over channels;
- ``clamped``: the share of z = gamma * y + beta beyond the clamp;
- ``v_decay_min``: the smallest per-sample decay ``1 - (1 - alpha_bkw) * mean(y^2)`` of v, and
  ``amplifying``, the share of (sample, channel) pairs where it is below -1 (the recurrence grows);
- ``u_max``, ``v_max``: the largest ``|u_ctrl|``, ``|v_ctrl|`` after the step;

and per step, the gradient norm over all parameters against a BatchNorm copy with the same
weights (:func:`onorm_convert.revert`) on the same batch.

    python benchmarks/finetune_probe.py [--variant NAME=JSON ...] [--out benchmarks/results]

Writes ``finetune_probe.json`` and ``finetune_probe.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from finetune import MODELS, Data, accuracy, parse_variant, pretrain, sample_order
from torch import Tensor, nn

from onorm_convert import OnlineNormBase, convert, revert

from common import RESULTS_DIR, environment, write_json
from train_digits import load_digits_split


class LayerProbe:
    """Forward hooks on every OnlineNorm of a model, recording what each sees in training mode."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, OnlineNormBase)}
        self.step: dict[str, dict[str, float]] = {}
        self.handles = [m.register_forward_pre_hook(self._record(name)) for name, m in self.layers.items()]

    def _record(self, name: str):
        def hook(layer: OnlineNormBase, args: tuple) -> None:
            if layer.training:
                self.step[name] = forward_measures(layer, args[0].detach())

        return hook

    def after_backward(self) -> dict[str, dict[str, float]]:
        """This step's measures per layer, with the controllers' size after the backward."""
        for name, layer in self.layers.items():
            self.step.setdefault(name, {}).update(u_max=_max_abs(layer.u_ctrl), v_max=_max_abs(layer.v_ctrl))
        step, self.step = self.step, {}
        return step


def forward_measures(layer: OnlineNormBase, x: Tensor) -> dict[str, float]:
    """What ``layer`` sees in ``x`` against its statistics before the batch (see the module docstring)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x.double() - layer.running_mean.double().reshape(shape)) / torch.sqrt(
        layer.running_var.double().reshape(shape) + layer.eps
    )
    m2 = y.square().reshape(len(y), y.shape[1], -1).mean(2)  # (N, C)
    z = y if layer.weight is None else y * layer.weight.double().reshape(shape) + layer.bias.double().reshape(shape)
    decay = 1 - (1 - layer.alpha_bkw) * m2
    per_channel = m2.mean(0)
    return {
        "second_moment_median": float(per_channel.median()), "second_moment_max": float(per_channel.max()),
        "clamped": float((z.abs() > layer.clamp_value).double().mean()) if layer.ecm == "clamp" else 0.0,
        "v_decay_min": float(decay.min()), "amplifying": float((decay < -1).double().mean()),
    }  # fmt: skip


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max())


def grad_norm(model: nn.Module) -> float:
    """The norm of all parameter gradients together."""
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))


def batchnorm_grad_norm(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The gradient norm a BatchNorm copy of ``model`` (same weights, batch statistics) gets on ``(x, y)``."""
    twin = revert(model).train()
    twin.zero_grad(set_to_none=True)
    F.cross_entropy(twin(x), y).backward()
    return grad_norm(twin)


def probe_run(
    model: nn.Module, data: Data, spec, batch: int, lr: float, steps: int, update: bool = True
) -> dict[str, Any]:
    """Fine-tune ``model`` (seed 0) recording :class:`LayerProbe` measures and the ON/BN gradient ratio each step.

    ``update=False`` keeps the weights frozen (no optimizer step): what the statistics and
    controllers do with nothing moving. Stops at the first non-finite loss or layer error.
    """
    probe = LayerProbe(model)
    torch.manual_seed(0)
    order = sample_order(len(data.train_y), steps * batch, 0)
    optimizer = spec.recipe.optimizer_for(model.parameters(), lr)
    records, error = [], None
    for step in range(1, steps + 1):
        index = order[(step - 1) * batch : step * batch]
        x, y = data.train_x[index], data.train_y[index]
        reference = batchnorm_grad_norm(model, x, y) if batch > 1 else float("nan")
        model.train()
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        except RuntimeError as err:
            error = f"step {step}: {err}"
            break
        layers = probe.after_backward()
        records.append(
            {
                "step": step,
                "loss": float(loss),
                "grad_norm": grad_norm(model),
                "bn_grad_norm": reference,
                "layers": layers,
            }
        )
        if not math.isfinite(float(loss)):
            error = f"step {step}: loss {float(loss)}"
            break
        if update:
            optimizer.step()
    return {"batch": batch, "lr": lr, "steps": steps, "update": update, "records": records, "error": error,
            "final_acc": accuracy(model, data) if error is None else None}  # fmt: skip


def summarize_layers(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per layer, the worst value of each measure over the run's steps."""
    worst: dict[str, dict[str, float]] = {}
    for record in run["records"]:
        for name, measures in record["layers"].items():
            into = worst.setdefault(name, {})
            for key, value in measures.items():
                pick = min if key == "v_decay_min" else max
                into[key] = pick(into.get(key, value), value)
    return worst


def run_probes(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The probe runs for each convert variant on the pretrained failing model."""
    spec = MODELS["strided_resnet"]
    data = Data.shaped(load_digits_split(), spec)
    pretrained, pretrained_acc = pretrain(spec, data, spec.pretrain_epochs)
    plans = {  # name -> (batch, lr, steps, update)
        "batch32": (32, spec.recipe.lr, 90, True),
        "batch32_frozen": (32, spec.recipe.lr, 40, False),
        "batch1_lr2e-3": (1, 2e-3, 300, True),
    }
    results: dict[str, Any] = {"environment": environment(), "pretrained_acc": pretrained_acc, "variants": {}}
    for label, options in variants.items():
        runs = {}
        for plan, (batch, lr, steps, update) in plans.items():
            run = probe_run(convert(pretrained, **options), data, spec, batch, lr, steps, update)
            run["worst_per_layer"] = summarize_layers(run)
            runs[plan] = run
            ratios = [r["grad_norm"] / r["bn_grad_norm"] for r in run["records"] if r["bn_grad_norm"] > 0]
            print(f"{label:<10} {plan:<15} final acc {run['final_acc']}  error {run['error']}  "
                  f"grad ratio first {ratios[0] if ratios else float('nan'):.2f} "
                  f"median {statistics.median(ratios) if ratios else float('nan'):.2f}", flush=True)  # fmt: skip
        results["variants"][label] = {"options": options, "runs": runs}
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Per variant: second moment, clamped share and v's smallest decay along the batch-32 run; the gradient ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for label, variant in results["variants"].items():
        records = variant["runs"]["batch32"]["records"]
        steps = [r["step"] for r in records]
        worst = lambda key, pick, records=records: [pick(m[key] for m in r["layers"].values()) for r in records]  # noqa: E731
        axes[0].semilogy(steps, worst("second_moment_max", max), label=label)
        axes[1].plot(steps, [100 * v for v in worst("clamped", max)], label=label)
        axes[2].plot(steps, worst("v_decay_min", min), label=label)
        frozen = variant["runs"]["batch32_frozen"]["records"]
        axes[3].plot(
            [r["step"] for r in frozen], [r["grad_norm"] / r["bn_grad_norm"] for r in frozen], label=f"{label}, frozen"
        )
        axes[3].plot(steps, [r["grad_norm"] / r["bn_grad_norm"] for r in records], ls="--", label=f"{label}, training")
    titles = ("largest mean(y^2) over layers", "largest clamped share (%)", "smallest v decay", "grad norm ON / BN")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step (batch 32, lr 0.02)")
        axis.grid(alpha=0.3)
    axes[2].axhline(-1, color="k", lw=0.8)
    axes[3].legend(fontsize=7)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="also probe convert(model, **JSON) under NAME (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run_probes({"defaults": {}, **dict(map(parse_variant, args.variant))})
    write_json(args.out / "finetune_probe.json", results)
    plot(results, args.out / "finetune_probe.png")
    print(f"wrote {args.out / 'finetune_probe.json'} and {args.out / 'finetune_probe.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
