#!/usr/bin/env bash
# The GPU checks that are still to be made (issue 11, docs/benchmarks.md "Outstanding: the GPU
# measurement"), as one prepared run for a lent H200: the `device` tool's machine has torch 2.11,
# torchvision 0.26 and Python 3.12, but no ray, pycocotools, s3fs or pydantic, and no network.
#
#   here, once (the wheels segdist's GPU path needs there, into .whl/, which git ignores):
#       bash benchmarks/gpu_check.sh fetch
#   there (aimed at 6-8 minutes; every result lands in $OUT, the log in $OUT/log.txt):
#       run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
#
# Steps: versions and nvidia-smi; the CUDA tests (those of the files that need no ray, s3fs or SAM); batch
# exactness on the GPU (benchmarks/gpu_exactness.py); the profile on the real GPU path (syncs
# counted by the dispatcher); images/s in fp32, bf16 and bf16 + channels_last. A failing step is
# logged and the next one runs. GPU_CHECK_DEVICE=cpu GPU_CHECK_IMAGES=2 GPU_CHECK_PRESETS=deepmask-zoom
# runs the same steps small on a CPU (a dry run of this script; expect the CUDA tests to skip).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
    grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing_extensions==4.16.0 pycocotools==2.0.11
fi

DEVICE=${GPU_CHECK_DEVICE:-cuda}
IMAGES=${GPU_CHECK_IMAGES:-128}
PRESETS=${GPU_CHECK_PRESETS:-deepmask-zoom,sharpmask-zoom,maskrcnn}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME COMMAND...: run it, log it, keep going
    local name=$1; shift
    echo "=== $name ($(date -u +%H:%M:%S)): $*"
    local t0=$SECONDS
    "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

{
step versions $PY -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__,
torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
step nvidia-smi nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step build-ext $PY setup.py -q build_ext --inplace
step cuda-tests $PY -m pytest -q -p no:cacheprovider -o addopts="" --timeout=300 -rs -k cuda \
    tests/test_dense.py tests/test_nms.py tests/test_rle.py
step exactness $PY benchmarks/gpu_exactness.py --device "$DEVICE" --presets "$PRESETS" \
    --images $((IMAGES < 24 ? IMAGES : 24)) --json "$OUT/exactness.json"
step profile $PY -m segdist bench --profile --presets "$PRESETS" --device "$DEVICE" \
    --images $((IMAGES < 20 ? IMAGES : 20)) --batch-size 64 --memory-budget-mb 65536 \
    --json "$OUT/profile.json"
for mode in fp32 bf16 bf16-cl; do
    extra=()
    case $mode in
        bf16) extra=(--precision bf16) ;;
        bf16-cl) extra=(--precision bf16 --channels-last) ;;
    esac
    step "images/s $mode" $PY -m segdist bench --presets "$PRESETS" --device "$DEVICE" --size mix \
        --images "$IMAGES" --window 64 --batch-size 64 --memory-budget-mb 65536 --big none \
        "${extra[@]}" --json "$OUT/bench-$mode.json"
done
} 2>&1 | tee "$OUT/log.txt"
