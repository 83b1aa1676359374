"""Real third-party models through convert -> fold -> export (issue 12's targets; `make zoo`).

Needs torchvision and timm, which do not install beside the project's torch 2.13 CPU build:
`make zoo` runs this in a venv of its own (.venv-zoo: torch 2.14.1, torchvision 0.29.1, timm).
Every model is built with pretrained weights off (nothing is downloaded) and its BatchNorm
statistics and affine are randomized, so that folding is not the identity.

Per model it reports:
- how many BatchNorm-family layers `convert` converted, of how many, and which it left (class, reason);
- `fold(model)` against `model` in eval, max abs diff, for the BN original and the converted model
  (`strip_clamp=False`, so the clamp stays on both sides);
- the ONNX op counts of the BN original's export and of the converted model's `--strip-clamp` export
  (both verified with onnxruntime), and where they differ.

Each model runs in a subprocess of its own with a time limit (`--timeout`, default 180 s).
Writes benchmarks/results/zoo.json and zoo.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# name -> (library, constructor path, input shape)
MODELS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "resnet18": ("torchvision", "models.resnet18", (1, 3, 64, 64)),
    "mobilenet_v2": ("torchvision", "models.mobilenet_v2", (1, 3, 64, 64)),
    "efficientnet_b0": ("torchvision", "models.efficientnet_b0", (1, 3, 64, 64)),
    "regnet_y_400mf": ("torchvision", "models.regnet_y_400mf", (1, 3, 64, 64)),
    "densenet121": ("torchvision", "models.densenet121", (1, 3, 64, 64)),
    "r3d_18": ("torchvision", "models.video.r3d_18", (1, 3, 8, 112, 112)),
    "deeplabv3_mobilenet_v3_large": (
        "torchvision",
        "models.segmentation.deeplabv3_mobilenet_v3_large",
        (1, 3, 64, 64),
    ),
    "timm efficientnet_b0": ("timm", "efficientnet_b0", (1, 3, 64, 64)),
    "timm cspdarknet53": ("timm", "cspdarknet53", (1, 3, 64, 64)),
}

FOLD_ATOL = 1e-4  # fold equals the model: max abs diff <= FOLD_ATOL * max(1, max |output|)


def build(name: str) -> nn.Module:
    library, path, _ = MODELS[name]
    if library == "timm":
        import timm

        return timm.create_model(path, pretrained=False)
    import torchvision

    obj: Any = torchvision
    for part in path.split("."):
        obj = getattr(obj, part)
    kwargs: dict[str, Any] = {"weights": None}
    if "segmentation" in path:
        kwargs["weights_backbone"] = None
    return obj(**kwargs)


def is_batchnorm_family(module: nn.Module) -> bool:
    from onorm_convert import OnlineNormBase

    if isinstance(module, OnlineNormBase):
        return False
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine for every BatchNorm-family layer (folding then does something)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not is_batchnorm_family(module):
                continue
            c = module.running_mean.shape[0]
            module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))


def tensors_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in tensors_of(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in tensors_of(item)]
    return []


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max abs diff of the outputs, max abs of a's outputs), both in eval mode."""
    a.eval()
    b.eval()
    with torch.no_grad():
        ta, tb = tensors_of(a(x)), tensors_of(b(x))
    diff = max(float((p - q).abs().max()) for p, q in zip(ta, tb, strict=True))
    scale = max(float(p.abs().max()) for p in ta)
    return diff, scale


def export_ops(model: nn.Module, path: Path, x: torch.Tensor, strip_clamp: bool) -> dict[str, Any]:
    import onorm_convert as oc
    from onorm_convert.export import ExportMismatchError

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = oc.export_onnx(model, path, x, strip_clamp=strip_clamp, verify=True)
        verified, error = True, None
    except ExportMismatchError as err:
        report, verified, error = err.report, False, f"verification failed: {err}".splitlines()[0]
    except Exception as err:  # noqa: BLE001 - the point is to record it
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", "op_counts": {}}
    fold = report.fold
    return {
        "verified": verified,
        "error": error,
        "op_counts": dict(sorted(report.op_counts.items())),
        "fold_actions": {a: fold.count(a) for a in ("folded", "affine", "kept")},
        "not_folded": [
            {"norm": s.norm, "kind": s.kind, "action": str(s.action), "reason": s.reason}
            for s in fold.steps
            if str(s.action) != "folded"
        ],
        "verification": None if report.verification is None else report.verification.summary(),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_one(name: str) -> dict[str, Any]:
    import onorm_convert as oc
    from onorm_convert.convert import convert_with_report

    torch.manual_seed(0)
    start = time.perf_counter()
    shape = MODELS[name][2]
    x = torch.randn(*shape)
    model = build(name).eval()
    randomize_norms(model)
    norms = Counter(type(m).__name__ for m in model.modules() if is_batchnorm_family(m))
    frozen = any("Frozen" in cls for cls in norms)
    result: dict[str, Any] = {"model": name, "input": list(shape), "norms": dict(norms), "frozen_bn": frozen}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, changes = convert_with_report(model, frozen_bn=frozen)
    converted.eval()
    left = [c for c in changes if c.new_type is None]
    remaining = Counter(type(m).__name__ for m in converted.modules() if is_batchnorm_family(m))
    result["norm_total"] = sum(norms.values())
    result["converted"] = sum(c.new_type is not None for c in changes)
    result["new_types"] = dict(Counter(c.new_type for c in changes if c.new_type))
    result["left"] = [{"name": c.name, "class": c.old_type, "note": c.note} for c in left]
    result["bn_remaining"] = dict(remaining)
    result["convert_diff"], _ = max_diff(model, converted, x)  # clamp on: for information

    for key, target in (("original", model), ("converted", converted)):
        try:
            folded = oc.fold(target, strip_clamp=False)
            diff, scale = max_diff(target, folded, x)
            result[f"fold_{key}"] = {
                "max_abs_diff": diff,
                "output_scale": scale,
                "ok": diff <= FOLD_ATOL * max(1, scale),
            }
        except Exception as err:  # noqa: BLE001
            result[f"fold_{key}"] = {"error": f"{type(err).__name__}: {err}".splitlines()[0], "ok": False}

    with tempfile.TemporaryDirectory() as tmp:
        result["onnx_bn"] = export_ops(model, Path(tmp) / "bn.onnx", x, strip_clamp=False)
        result["onnx_on"] = export_ops(converted, Path(tmp) / "on.onnx", x, strip_clamp=True)
    bn_ops, on_ops = result["onnx_bn"]["op_counts"], result["onnx_on"]["op_counts"]
    result["op_diff"] = {
        op: [bn_ops.get(op, 0), on_ops.get(op, 0)]
        for op in sorted(set(bn_ops) | set(on_ops))
        if bn_ops.get(op, 0) != on_ops.get(op, 0)
    }
    result["ops_equal"] = bool(bn_ops) and not result["op_diff"]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def fmt(x: float) -> str:
    return f"{x:.1e}"


def row(r: dict[str, Any]) -> str:
    if "crash" in r:
        return f"| {r['model']} | - | - | - | - | - | {r['crash']} |"
    norms = ", ".join(f"{k} x{v}" for k, v in sorted(r["norms"].items()))
    conv = f"{r['converted']} / {r['norm_total']}"

    def fold_cell(f: dict[str, Any]) -> str:
        if "error" in f:
            return f"error: {f['error']}"
        return f"{fmt(f['max_abs_diff'])} ({'ok' if f['ok'] else 'NOT EQUAL'})"

    bn, on = r["onnx_bn"], r["onnx_on"]
    if bn.get("error") and not bn["op_counts"] or on.get("error") and not on["op_counts"]:
        ops = f"export error: BN {bn.get('error')}; ON {on.get('error')}"
    elif r["ops_equal"]:
        ops = f"equal ({sum(bn['op_counts'].values())} ops)"
    else:
        ops = "differ: " + ", ".join(f"{op} {a} vs {b}" for op, (a, b) in r["op_diff"].items())
    notes = []
    for side, e in (("BN", bn), ("ON", on)):
        if e.get("error") and e["op_counts"]:
            notes.append(f"{side} export {e['error']}")
    if r["left"]:
        left = Counter(f"{c['class']} ({c['note']})" for c in r["left"])
        notes.append("left: " + "; ".join(f"{k} x{v}" for k, v in left.items()))
    unfolded = Counter(f"{s['kind']} {s['action']}" for s in on.get("not_folded", []))
    if unfolded:
        notes.append("ON export not folded: " + ", ".join(f"{k} x{v}" for k, v in sorted(unfolded.items())))
    return (
        f"| {r['model']} | {norms} | {conv} | {fold_cell(r['fold_original'])} | {fold_cell(r['fold_converted'])} "
        f"| {ops} | {'; '.join(notes) or '-'} |"
    )


HEADER = (
    "| model | BatchNorm-family layers | converted | fold(BN) vs BN | fold(ON) vs ON | ONNX ops: BN vs ON stripped | notes |\n"
    "|---|---|---:|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print its JSON
    parser.add_argument("--name", default="zoo")
    args = parser.parse_args()
    if args.one:
        try:
            result = run_one(args.one)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            result = {
                "model": args.one,
                "crash": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            }
        print("ZOO-RESULT " + json.dumps(result))
        return

    import timm
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
    print(f"versions: {versions}", flush=True)
    print(HEADER, flush=True)
    results = []
    for name in args.models:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", name],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ZOO-RESULT ")]
            if lines:
                result = json.loads(lines[-1][len("ZOO-RESULT ") :])
            else:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                result = {"model": name, "crash": f"exit {proc.returncode}: {tail[0]}"}
        except subprocess.TimeoutExpired:
            result = {"model": name, "crash": f"skipped: over {args.timeout:.0f} s"}
        result.setdefault("seconds", round(time.perf_counter() - start, 1))
        results.append(result)
        print(row(result), flush=True)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(
        json.dumps({"versions": versions, "results": results}, indent=2) + "\n"
    )
    md = [
        f"# Real models: convert -> fold -> export ({', '.join(f'{k} {v}' for k, v in versions.items())})",
        "",
        "Random weights, randomized BatchNorm statistics and affine; fold compared in eval, max abs diff "
        f"(ok: <= {FOLD_ATOL} x max(1, max |output|)); ONNX op counts of the BN original's export vs the "
        "converted model's `strip_clamp=True` export, both verified with onnxruntime.",
        "",
        HEADER,
        *(row(r) for r in results),
        "",
    ]
    (RESULTS_DIR / f"{args.name}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
