#!/usr/bin/env bash
# One entry for a fresh machine: install what is missing, build the C++ extension, then run a job.
#   bash scripts/run.sh train   train PSPNet on CamVid (configs/camvid.yaml), then evaluate on val
#   bash scripts/run.sh test    run the test suite
# Extra arguments after the job name go to pytest (test) or to `python -m pspnet.train` (train).
# Environment: PYTHON (default python3), CAMVID_ROOT (default ../shared/data/camvid), RUN_DIR (default
# runs/camvid-<date>-<time>: a new folder per run, so no earlier run is overwritten).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
job=${1:-}
[ $# -gt 0 ] && shift

setup() {
    # Reuse an installed torch; never let pip resolve an unpinned one (it would pull CUDA packages).
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install --quiet torch==2.13.0
    fi
    "$PY" -m pip install --quiet -r requirements.txt
    # CUTLASS's headers for csrc/cuda/conv.cu (header-only: its Python tooling's dependencies are not needed)
    "$PY" -m pip install --quiet --no-deps -r requirements-cuda.txt
    # Builds psp_kernels._C in place; --no-deps keeps pip away from torch. Skipped when the package is
    # installed and the built extension is newer than every C++ source and setup.py.
    local so
    so=$(ls psp_kernels/_C*.so 2>/dev/null | head -n 1 || true)
    if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null)" ] \
            || ! "$PY" -m pip show --quiet psp-kernels >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
    fi
}

case "$job" in
    test)
        setup
        # one pytest-xdist worker per core, whole test files per worker (module-scoped fixtures built once)
        exec "$PY" -m pytest tests -q -n auto --dist loadfile -p no:benchmark "$@"
        ;;
    train)
        setup
        data=${CAMVID_ROOT:-../shared/data/camvid}
        out=${RUN_DIR:-runs/camvid-$(date +%Y%m%d-%H%M%S)}
        "$PY" -m pspnet.train --config configs/camvid.yaml --data_root "$data" --save_path "$out" "$@"
        "$PY" -m pspnet.evaluate --config configs/camvid.yaml --data_root "$data" \
            --checkpoint "$out/final.pth" --split val --save-dir "$out/eval"
        ;;
    *)
        echo "usage: bash scripts/run.sh {train|test} [extra args]" >&2
        exit 2
        ;;
esac
