#!/usr/bin/env bash
# The test suite on the lent GPU: every kernel test runs its compiled kernel on CUDA (natively, not in
# Triton's interpreter), including the GPU-only branches (hardware e4m3 casts, cvt.rni rounding, the
# Gluon kernels on sm90) that CI on CPU cannot reach.
#
#   source benchmarks/gpu_env.sh; bash benchmarks/gpu_tests.sh [TEST PATHS...]   (default: tests/kernels tests/ops)
#
# The rest of tests/ runs on a GPU machine as well (its models on the CPU, tests/conftest.py; the pass tests'
# Triton paths on the GPU): session 31 on an H100 ran tests/kernels + tests/ops (955 passed) and the rest
# (413 passed, 10 skipped) as two commands with GPU_TEST_WORKERS=14, each well inside the 540 s stop.
#
# pytest, pytest-xdist and pytest-timeout are in the GPU image. Workers compile in parallel (one GPU is
# shared); each test has a 300 s limit, the whole run stops at 540 s so that one device call returns its
# log. Writes $OUT/pytest_gpu.log and $OUT/pytest_gpu.xml (JUnit) when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
paths=("$@")
[ ${#paths[@]} -eq 0 ] && paths=(tests/kernels tests/ops)
workers=${GPU_TEST_WORKERS:-8}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 2
# pytest imports ./turbocompile from the repo root, which lacks kernels/, passes/ and recipes/ unless an
# editable install maps them; where gpu_env.sh fell back to its source mirror, link them for this run only.
links=()
if ! python3 -c "import turbocompile.kernels, turbocompile.passes" 2>/dev/null; then
  for p in kernels passes recipes; do
    [ -e "turbocompile/$p" ] || { ln -s "../$p" "turbocompile/$p" && links+=("turbocompile/$p"); }
  done
  trap 'rm -f "${links[@]}"' EXIT
fi
timeout "${GPU_TEST_BUDGET_S:-540}" python3 -m pytest -q -p no:cacheprovider -n "$workers" --timeout 300 \
  -rfEs --junitxml="$out/pytest_gpu.xml" "${paths[@]}" 2>&1 | tee "$out/pytest_gpu.log"
