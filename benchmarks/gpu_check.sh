#!/usr/bin/env bash
# The GPU path in one command, on a machine with an NVIDIA GPU, a CUDA toolkit and torch preinstalled
# but no network:  bash benchmarks/gpu_check.sh   (from the repository root; ~5 minutes on an H100)
#   1. builds the extension for the local GPU (pip install --no-build-isolation --no-deps .),
#   2. runs the CUDA tests,
#   3. checks every op CUDA vs CPU and times the kernels, a training step and geolocate
#      (benchmarks/gpu_check.py), printing one Markdown table (also written to $GPU_CHECK_OUT if set).
# Without a GPU it stops at once with a message and exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run this on a GPU machine" >&2
  exit 2
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "gpu_check: nvcc not found: a CUDA toolkit is needed to build the kernels (put its bin/ on PATH)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
start=$(date +%s)

echo "== 1. build for the local GPU" >&2
LOCDIFF_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=native ${CMAKE_ARGS:-}" \
  python -m pip install -q --no-build-isolation --no-deps . || { echo "gpu_check: the build failed" >&2; exit 1; }
echo "   built in $(( $(date +%s) - start )) s" >&2

echo "== 2. CUDA tests" >&2
status=0
# from a folder outside the checkout, so that the installed package (with its compiled module) is imported
tests="$PWD/tests"
(cd /tmp && LOCDIFF_EXPECT_CUDA=1 python -m pytest -q -p no:cacheprovider -o addopts="" --rootdir="$tests" \
   "$tests/kernels/test_cuda.py" "$tests/kernels/test_ops.py") || status=1

echo "== 3. CUDA vs CPU and timings" >&2
(cd /tmp && python "$OLDPWD/benchmarks/gpu_check.py" --device cuda) | tee "${GPU_CHECK_OUT:-/dev/null}" || status=1
echo "gpu_check: done in $(( $(date +%s) - start )) s, status $status" >&2
exit $status
