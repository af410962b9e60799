#!/usr/bin/env bash
# The checks that need a CUDA GPU (issue 6), in stages that each fit a 10-minute command, for a GPU
# machine that has torch and triton but no package index (see benchmarks/README.md).
#
#   bash benchmarks/gpu_checks.sh wheels   # where pip reaches an index: the other packages the
#                                          # tests import, as wheels into .whl/ (PYVER, default 3.12)
#   bash benchmarks/gpu_checks.sh tests    # on the GPU machine: the whole suite (CUDA parity of the
#                                          # Triton kernels, the CUDA-graph tests, ...); pytest
#                                          # arguments after `tests` run a part of it instead
#   bash benchmarks/gpu_checks.sh bench    # on the GPU machine: benchmarks/kernels.py --quick, then
#                                          # the full run written to benchmarks/RESULTS.md
#
# On the GPU machine the wheels in .whl/ (if any) are installed into /tmp/site and imgdiff is
# imported from src/. Logs (and the rewritten RESULTS.md) go to $OUT when it is set, else to
# gpu-checks/.
set -euo pipefail
cd "$(dirname "$0")/.."

stage=${1:-}
shift || true
py=${PYTHON:-python3}
out=${OUT:-gpu-checks}

# what the GPU image lacks of the dev dependencies (pyproject.toml), with what those need in turn
# (keep these versions equal to .ci/gpu-image-versions.txt, which CI tests on the CPU)
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 open_clip_torch==3.3.0
        ftfy==6.3.1 wcwidth==0.9.4 lpips==0.1.4)

setup_gpu_machine() {
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    else
        export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name())' | tee "$out/device.txt"
}

case "$stage" in
wheels)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
tests)
    setup_gpu_machine
    # -rs lists what was skipped and why: on a GPU nothing should say "needs CUDA"
    "$py" -m pytest -q -n "${WORKERS:-8}" -rs -p no:cacheprovider "$@" 2>&1 | tee "$out/tests.log"
    ;;
bench)
    setup_gpu_machine
    "$py" benchmarks/kernels.py --quick 2>&1 | tee "$out/kernels-quick.log"
    "$py" benchmarks/kernels.py --write benchmarks/RESULTS.md 2>&1 | tee "$out/kernels.log"
    cp benchmarks/RESULTS.md "$out/"
    ;;
*)
    echo "usage: bash benchmarks/gpu_checks.sh wheels|tests|bench" >&2
    exit 2
    ;;
esac
