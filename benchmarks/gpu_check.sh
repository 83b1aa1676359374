#!/usr/bin/env bash
# The checks that need a GPU (issue 15), in one command that fits 10 minutes on an H200:
#
#   1. tests/test_triton.py on CUDA: the compiled Triton kernels against the float64 CPU
#      reference and the scans, and the tests marked `cuda` (ResNet-50 layer shapes in
#      float32 and bfloat16 channels_last, bf16 autocast);
#   2. benchmarks/bench_layer.py --device cuda, float32 and bfloat16: forward + backward
#      against cuDNN's BatchNorm in the same process (target: channels_last geometric mean
#      <= 1.3x, dense <= 2x);
#   3. benchmarks/bench_train_step.py --device cuda: a ResNet-50 train step, bf16 autocast,
#      channels_last, batch 64 at 224x224, against BatchNorm's (target <= 1.10x).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# Run from the repository root; nothing is installed (onorm_convert is imported from the
# working tree). Each step's output goes to OUT_DIR/<step>.log, the benchmarks' figures to
# OUT_DIR/*.json, and OUT_DIR/gpu_check.json says how each step ended. OUT_DIR defaults to
# $OUT, else benchmarks/results/gpu. A machine without pytest (or typer, which the tests'
# conftest imports) can be lent them as pure-Python packages in build/gpu-deps
# (`pip install --target build/gpu-deps pytest typer` on a machine that has a registry).
# --dry-run runs the same steps on the CPU with tiny shapes (the tests on Triton's
# interpreter), to check the plumbing where there is no GPU. Exit status: the number of
# steps that failed.
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda
if [ "${1:-}" = "--dry-run" ]; then
    DEVICE=cpu
    shift
fi
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
if [ -d build/gpu-deps ]; then
    export PYTHONPATH="$PWD/build/gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=0  # the kernels ask for no fusion themselves; this silences Triton 3.9's notice
export ONORM_CACHE_DIR="${TMPDIR:-/tmp}/onorm-gpu-check-cache"  # the native kernels' build, outside the tree

failed=0
results=()

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to OUT_DIR/NAME.log and the tail on screen.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    results+=("\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start))}")
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step environment 60 "$PYTHON" -c '
import torch, triton
print("python torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
from onorm_convert.layers import ops
print("ONORM_BACKEND unset: CUDA tensors take", ops.implementation(torch.empty(0, device="cuda")).name
      if torch.cuda.is_available() else "(no CUDA device)")
'

if [ "$DEVICE" = cuda ]; then
    step tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton.py
    for dtype in float32 bfloat16; do
        step "bench_layer_$dtype" 90 "$PYTHON" benchmarks/bench_layer.py --device cuda --dtype "$dtype" \
            --no-compiled --repeats 25 --json "$OUT_DIR/bench_layer_cuda_$dtype.json"
    done
    step bench_train_step 150 "$PYTHON" benchmarks/bench_train_step.py --device cuda --models resnet50 \
        --batch 64 --size 224 --autocast bfloat16 --channels-last --no-compiled --repeats 10 \
        --json "$OUT_DIR/bench_train_step_cuda.json"
else
    step tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_triton.py
    for dtype in float32 bfloat16; do
        step "bench_layer_$dtype" 120 "$PYTHON" benchmarks/bench_layer.py --device cpu --dtype "$dtype" \
            --no-compiled --quick --repeats 2 --json "$OUT_DIR/bench_layer_cpu_$dtype.json"
    done
    step bench_train_step 120 "$PYTHON" benchmarks/bench_train_step.py --device cpu --models resnet50 \
        --quick --batch 2 --autocast bfloat16 --channels-last --no-compiled --repeats 1 \
        --json "$OUT_DIR/bench_train_step_cpu.json"
fi

summary=$(IFS=,; echo "${results[*]}")
echo "{\"device\": \"$DEVICE\", \"failed\": $failed, \"steps\": {$summary}}" >"$OUT_DIR/gpu_check.json"
echo "wrote $OUT_DIR/gpu_check.json: $failed step(s) failed"
exit "$failed"
