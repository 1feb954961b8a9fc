#!/usr/bin/env bash
# One-shot GPU check for a machine with an NVIDIA GPU (H100/H200) and nothing of this project installed:
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. set-up: a CUDA-enabled torch if this one has none (torch==2.13.0 from PyTorch's CUDA index; an
#    installed CUDA torch is kept, whatever its version), the packages of requirements.txt and
#    requirements-cuda.txt that are missing (installed ones are kept: the machine's triton matches its
#    torch), offline from the wheels in .whl/ when that folder exists, then the extension built with its
#    CUDA kernels;
# 2. bench/gpu_check.py: GPU tests, determinism, a PSPNet-50 bf16 training step fused vs unfused and the
#    reduced benchmark matrix, each stage in its own share of the time budget.
# Everything goes into OUT_DIR (default bench/results/gpu_check-<date>-<time>), which it prints; summary.md
# there lists every stage. Where torch sees no CUDA GPU it says so in one line and exits 1.
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (default 480: the whole run, set-up included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-480}
out=${1:-bench/results/gpu_check-$(date -u +%Y%m%d-%H%M%S)}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

cuda_torch() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

if ! cuda_torch; then
    if nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: this torch has no CUDA; installing torch==2.13.0 for CUDA 13.0"
        "$PY" -m pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130 || true
    fi
    if ! cuda_torch; then
        echo "gpu_check: no CUDA GPU visible to torch on this machine; it needs an NVIDIA GPU (H100 or H200)" >&2
        exit 1
    fi
fi

pip_from=()
[ -d .whl ] && pip_from=(--no-index --find-links .whl)
missing=$("$PY" - <<'PY'
import importlib.metadata as metadata
import re
for name in ("requirements.txt", "requirements-cuda.txt"):
    for line in open(name):
        requirement = line.split("#")[0].strip()
        if requirement:
            try:
                metadata.version(re.split(r"[=<>!~ ;\[]", requirement)[0])
            except metadata.PackageNotFoundError:
                print(requirement)
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: installing" $missing
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install --quiet --no-deps "${pip_from[@]}" $missing; then
        echo "gpu_check: could not install" $missing "(offline? put their wheels in .whl/:" \
             "pip download --no-deps <requirement> -d .whl)" >&2
        exit 1
    fi
fi

start=$SECONDS
echo "gpu_check: building the extension with its CUDA kernels"
if ! MAX_JOBS=$(nproc) "$PY" -m pip install --quiet --no-build-isolation --no-deps --no-index -e .; then
    echo "gpu_check: the extension did not build (the compiler's messages are above)" >&2
    exit 1
fi
echo "gpu_check: built in $((SECONDS - start)) s"

exec "$PY" bench/gpu_check.py --out "$out" --seconds $((budget - SECONDS))
