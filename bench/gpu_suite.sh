#!/usr/bin/env bash
# The GPU measurement, one command on the lent GPU machine (from the repository root):
#   bash bench/gpu_suite.sh
# Installs the package against the machine's own torch (no network: --no-deps), builds the C++ extension, runs
# the backend tests with CUDA tensors (Triton compiled, not interpreted), then the GPU benchmark, which writes
# bench/results/gpu_ops.md (device, versions, command). Copies logs and results to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python - <<'PY'
import torch, triton, platform
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, device {torch.cuda.get_device_name()}")
PY
mkdir -p bench/results
set +e
python -m pytest tests/test_backends.py tests/test_reference.py -q -x -p no:cacheprovider 2>&1 | tee bench/results/gpu_tests.log
tests=${PIPESTATUS[0]}
python -m pytest bench/test_gpu_ops.py -q -p no:cacheprovider 2>&1 | tee bench/results/gpu_bench.log
bench=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then cp bench/results/gpu_* "$OUT"/ 2>/dev/null || true; fi
echo "gpu_suite: tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
