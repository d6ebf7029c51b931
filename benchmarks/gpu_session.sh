#!/usr/bin/env bash
# One GPU session's checks in one command, within a 10-minute device call.
#
#   bash benchmarks/gpu_session.sh prepare   # here, with network: wheels of fastdca and the test tools into .gpu-wheels/
#   bash benchmarks/gpu_session.sh run       # on the GPU machine (carry .gpu-wheels): everything under $OUT
#
# `run` installs the wheels without network, then: nvidia-smi; `fastdca check` (numerics of every kernel variant
# against the float64 reference, then speed of each beside SDPA at T = 2048 and 8192); the kernel and op tests
# compiled on the GPU; the op benchmarks of benchmarks/test_gpu.py. Each step has its own time limit, so one
# that hangs or fails leaves the others' results; $OUT/summary.txt lists each step's exit status and seconds.
set -u
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels

if [ "${1:-}" = "prepare" ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    python -m pip wheel --no-deps -q -w "$WHEELS" . &&
    python -m pip download -q --only-binary :all: --python-version 3.12 -d "$WHEELS" \
        pytest pytest-benchmark py-cpuinfo iniconfig pluggy
    exit $?
fi
if [ "${1:-}" != "run" ]; then
    echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2
    exit 2
fi

OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
step() {    # step NAME SECONDS COMMAND...: output to $OUT/NAME.txt, status and time to $OUT/summary.txt
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name rc=$? ${limit}s-limit $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
}
# fastdca without its dependencies (the machine has torch, Triton and transformers, and no bitsandbytes);
# the test tools with theirs, from the wheels alone
step install 60 bash -c "python -m pip install --no-index --no-deps -q $WHEELS/fastdca-*.whl &&
    python -m pip install --no-index --find-links $WHEELS -q pytest pytest-benchmark"
step nvidia-smi 10 nvidia-smi
step check 210 python -m fastdca.cli check --json "$OUT/check.json"
step gpu-tests 150 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_ops.py
step benchmarks 150 python -m pytest -q -p no:cacheprovider benchmarks/test_gpu.py --benchmark-only \
    -k "test_gpu_op and (2048 or 8192)" --benchmark-json="$OUT/benchmarks.json"
