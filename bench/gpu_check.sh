#!/usr/bin/env bash
# The one command a lent GPU machine runs (from the repository root; the machine's own python3, torch, triton):
#
#   bash bench/gpu_check.sh RESULTS_DIR [STAGE...]
#
# Installs the package against the machine's torch without network or C++ build, then runs each stage of
# bench/gpu_check.py in its own process under `timeout` (a stage that overruns loses only itself), appending to
# RESULTS_DIR/results.jsonl as it goes. Naming stages reruns only those (the summary is always rewritten).
# Writes only RESULTS_DIR/{results.jsonl,summary.md,gpu_check.log} (Triton's cache goes to /tmp).
# Stage time limits (seconds) keep the whole check within about 12 minutes (typically ~6), Triton compile and the
# CUDA library's build (stage build: sm_90a only, ~30 s on 16 cores; skipped when an up-to-date one was carried)
# included. The dispatch stage writes RESULTS_DIR/cuda_dispatch.json: copy it to dcgmm_fast/backends/ to commit.
set -uo pipefail
if [ $# -lt 1 ]; then echo "usage: bash bench/gpu_check.sh RESULTS_DIR [STAGE...]" >&2; exit 2; fi
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 DCGMM_NO_EXTENSION=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/dcgmm-triton-cache}"   # shared by every stage
PY=python3
log="$out/gpu_check.log"
declare -A LIMIT=([env]=20 [build]=120 [ceilings]=40 [tests]=150 [accuracy]=75 [timings]=90 [sweep]=40 [train]=100 [sanitizer]=70 [dispatch]=20 [summary]=20)
ORDER=(env build ceilings tests accuracy timings sweep train sanitizer dispatch)
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=("${ORDER[@]}")
echo "== gpu_check $(date -u +%FT%TZ) stages: ${stages[*]}" | tee -a "$log"
if ! $PY -c "import dcgmm_fast" 2>/dev/null; then
  $PY -m pip install -q --no-build-isolation --no-deps -e . >>"$log" 2>&1 || echo "install failed (see log)" | tee -a "$log"
fi
for s in "${stages[@]}"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "unknown stage $s (known: ${ORDER[*]} summary)" | tee -a "$log"; continue; }
  start=$(date +%s)
  timeout --kill-after=5 "${LIMIT[$s]}" $PY bench/gpu_check.py "$s" "$out" >>"$log" 2>&1
  rc=$?
  echo "== stage $s: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$log"
  if [ $rc -ne 0 ]; then
    printf '{"stage": "%s", "exit": %d, "note": "stage failed or timed out after %s s limit; see gpu_check.log"}\n' \
      "$s" "$rc" "${LIMIT[$s]}" >> "$out/results.jsonl"
  fi
done
timeout 20 $PY bench/gpu_check.py summary "$out" >>"$log" 2>&1
echo "== done: $out/summary.md" | tee -a "$log"
