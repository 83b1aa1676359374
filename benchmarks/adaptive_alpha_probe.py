"""A candidate for issue 10, prototyped in eager mode: alpha_fwd chosen per layer from the drift it sees.

The fine-tuning benchmark (``finetune.py``) shows that no fixed alpha_fwd serves every recipe:
a slow AdamW recipe (``mobile_dw``) wants slower statistics than 0.99, fast SGD ones
(``strided_resnet``, ``preact_resnet``) faster. This script tries a rule that lets each
layer find its own, without changing the layers: a forward pre-hook on every OnlineNorm of a
converted model sets the layer's ``alpha_fwd`` before each training call.

The rule. Before each call, the layer's drift signal ``d`` is the batch's innovation against
the streaming statistics: per channel ``(batch mean - running_mean) / sqrt(running_var)``
(``--signal mean``), with ``log(batch var / running_var)`` appended (``--signal mean+var``).
Statistics that lag behind a drift see innovations that keep their direction from one call to
the next; statistics that are merely noisy see unrelated ones. So with
``rho = cos(d, d_prev)``, ``log(1 - alpha_fwd) += eta * batch * rho``, clipped to
``--bounds``: a positive correlation shortens the memory, a negative one lengthens it.
``eta`` is per sample (the doc's alphas are), so at batch
1 each call moves 32 times less than at batch 32.

Eager only, a Python float per call. It is how the rule was chosen; the layers now build it in
(``alpha_mode="adaptive"``, ``onorm_convert/layers/adaptive_alpha.py``: the mean's shift as the
signal, bounds [0.99, 0.999]) as state tensors that ``torch.compile`` traces. Here the models
are converted with ``alpha_mode="fixed"`` and the hook adapts their alpha.

    python benchmarks/adaptive_alpha_probe.py [--models a,b] [--batches 32,1] [--signal mean+var]
        [--eta 0.00625] [--bounds 0.95:0.999] [--seeds 3] [--name adaptive_alpha]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from finetune import MODELS, Config, Data, batch1_learning_rate, load_digits_split, pretrain, train
from torch import Tensor, nn

from onorm_convert import OnlineNormBase, convert

from common import RESULTS_DIR, environment, write_json, write_text

SIGNALS = ("mean", "mean+var")


@dataclass(frozen=True)
class Rule:
    """The adaptation rule's settings (see the module docstring)."""

    signal: str = "mean+var"
    eta: float = 0.2 / 32  # per sample: 0.2 per call at batch 32
    bounds: tuple[float, float] = (0.95, 0.999)  # alpha_fwd's range


def drift_signal(x: Tensor, mean: Tensor, var: Tensor, signal: str) -> Tensor:
    """The batch's innovation against the streaming statistics ``mean``, ``var`` (per channel), as one vector."""
    dims = [0, *range(2, x.ndim)]
    batch_mean, batch_var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    shift = (batch_mean - mean) / torch.sqrt(var + 1e-5)
    if signal == "mean":
        return shift
    return torch.cat((shift, torch.log((batch_var + 1e-5) / (var + 1e-5))))


def adapted_alpha(alpha: float, rho: float, batch: int, rule: Rule) -> float:
    """alpha_fwd after one call whose innovation had cosine ``rho`` with the previous call's."""
    low, high = rule.bounds
    log_k = math.log(1 - alpha) + rule.eta * batch * rho
    return 1 - math.exp(min(max(log_k, math.log(1 - high)), math.log(1 - low)))


def adapt_alphas(model: nn.Module, rule: Rule) -> dict[str, list[float]]:
    """Hook every OnlineNorm of ``model`` to adapt its alpha_fwd by ``rule``; returns each layer's alpha trace."""
    traces: dict[str, list[float]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, OnlineNormBase):
            continue
        previous: list[Tensor] = []

        def before_call(module, args, name=name, previous=previous):
            if not module.training:
                return
            with torch.no_grad():
                d = drift_signal(args[0], module.running_mean, module.running_var, rule.signal)
            if previous:
                rho = float((d * previous[0]).sum() / (d.norm() * previous[0].norm() + 1e-12))
                module.alpha_fwd = adapted_alpha(module.alpha_fwd, rho, args[0].shape[0], rule)
            previous[:] = [d]
            traces.setdefault(name, []).append(module.alpha_fwd)

        layer.register_forward_pre_hook(before_call)
    return traces


def run(models: list[str], batches: list[int], rule: Rule, seeds: int) -> dict:
    """Pretrain each model, convert it with the defaults, fine-tune it with the rule hooked in; per-seed results."""
    split, config = load_digits_split(), Config()
    results = []
    for model_name in models:
        spec = MODELS[model_name]
        data = Data.shaped(split, spec)
        pretrained, _ = pretrain(spec, data, spec.pretrain_epochs)
        for batch in batches:
            steps = config.steps[batch]
            lr = spec.recipe.lr if batch == 32 else batch1_learning_rate(pretrained, spec, data, steps)[0]
            for seed in range(seeds):
                model = convert(copy.deepcopy(pretrained), alpha_mode="fixed")  # the hook adapts it
                traces = adapt_alphas(model, rule)
                record = train(model, data, spec.recipe, batch, lr, steps, seed)
                record.update(model=model_name, final_alphas={k: v[-1] for k, v in traces.items()})
                results.append(record)
                print(f"  {model_name:<15} batch {batch:>2} seed {seed}: "
                      + (f"FAILED {record['error']}" if record["error"] else f"{record['final_acc']:.2f}%")
                      + f", final alphas {min(record['final_alphas'].values()):.4f}-{max(record['final_alphas'].values()):.4f}",
                      flush=True)  # fmt: skip
    return {"environment": environment(), "rule": rule.__dict__, "runs": results}


def markdown_table(results: dict) -> str:
    """Mean ± std of held-out accuracy per model and batch, and the range of the final alphas."""
    lines = [
        "| model | batch | adaptive alpha_fwd | final alphas (all layers, seeds) | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    keys = dict.fromkeys((r["model"], r["batch"]) for r in results["runs"])
    for model, batch in keys:
        runs = [r for r in results["runs"] if (r["model"], r["batch"]) == (model, batch)]
        finals = [r["final_acc"] for r in runs if r["error"] is None]
        alphas = [a for r in runs for a in r["final_alphas"].values()]
        cell = f"{statistics.fmean(finals):.2f} ± {statistics.pstdev(finals):.2f}" if finals else "failed"
        lines.append(f"| {model} | {batch} | {cell} | {min(alphas):.4f}-{max(alphas):.4f} | "
                     f"{sum(r['error'] is not None for r in runs)} |")  # fmt: skip
    rule = results["rule"]
    lines += ["", f"Rule: signal {rule['signal']}, eta {rule['eta']:.4g} per sample, bounds {rule['bounds']}; "
              f"held-out accuracy (%), mean ± std over seeds; compare with finetune*.md (same pretraining, seeds, steps)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="32,1")
    parser.add_argument("--signal", choices=SIGNALS, default=Rule.signal)
    parser.add_argument("--eta", type=float, default=Rule.eta)
    parser.add_argument("--bounds", default="0.95:0.999", help="LOW:HIGH, alpha_fwd's range")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="adaptive_alpha")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    low, high = map(float, args.bounds.split(":"))
    rule = Rule(args.signal, args.eta, (low, high))
    results = run(args.models.split(","), [int(b) for b in args.batches.split(",")], rule, args.seeds)
    table = markdown_table(results)
    print("\n" + table)
    write_json(args.out / f"{args.name}.json", results)
    write_text(args.out / f"{args.name}.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
