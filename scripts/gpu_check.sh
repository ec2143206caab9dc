#!/usr/bin/env bash
# The GPU check of the CUDA path (docs/gpu.md): run once on a fresh CUDA machine with this
# checkout; about 5 minutes, at most 8.
#
#   scripts/gpu_check.sh          (or: make gpu-check)
#
# 1. Picks a Python whose torch sees a CUDA device: $PYTHON, .venv/bin/python, python3. The
#    machine may be offline, so nothing is downloaded: the checkout runs from src/ (PYTHONPATH),
#    and pytest must be importable there. Without a CUDA device it says so, runs the GPU tests
#    with the local venv to show that they skip, and exits 0.
# 2. pytest -m gpu tests/kernels/test_gpu.py: foreach and Triton parity over the option table,
#    no synchronisation in a step, CUDA-graph capture and replay, run-to-run determinism, the
#    device guard (two GPUs), the GPT-2 launch count, the foreach path's extra memory.
# 3. benchmarks/bench_gpu.py: step times of our op (foreach, Triton), torch.optim.Adafactor
#    (foreach) and AdamW (fused) on GPT-2 small and a 1B LLaMA-like set, fp32 and bf16, against
#    a bandwidth roofline measured in the same run.
#
# Results in $GPU_CHECK_OUT (default: $OUT when set, else build/gpu-check): gpu_check.log,
# pytest.log, junit.xml, bench_gpu.json, bench_gpu.md, env.txt. Exit status: that of pytest
# (the benchmark's failures are reported in its JSON, not in the status).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-build/gpu-check}}
mkdir -p "$OUT_DIR"
START=$(date +%s)
log() { echo "[gpu-check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT_DIR/gpu_check.log"; }

has_cuda() {
  "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY=$cand; break; fi
done
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "$PY" ]; then
  log "no CUDA device (or no CUDA-enabled torch) found: the GPU checks are skipped"
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import pytest' 2>/dev/null; then
    log "dry run: the GPU tests collect and skip"
    .venv/bin/python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_gpu.py \
      2>&1 | tail -n 3 | tee -a "$OUT_DIR/gpu_check.log"
    .venv/bin/python benchmarks/bench_gpu.py --out "$OUT_DIR" | tee -a "$OUT_DIR/gpu_check.log"
  fi
  exit 0
fi

{
  echo "python: $PY"
  "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the Triton tests skip)")
PYEOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
} > "$OUT_DIR/env.txt" 2>&1
log "environment: $(tr '\n' ' ' < "$OUT_DIR/env.txt")"

if ! "$PY" -c 'import pytest' 2>/dev/null; then
  log "pytest is not importable by $PY; trying pip (the machine may be offline)"
  "$PY" -m pip install -q pytest >/dev/null 2>&1 || log "could not install pytest"
fi

log "pytest -m gpu (limit 330 s)"
timeout 330 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_gpu.py \
  -rfEs --durations=15 --junitxml="$OUT_DIR/junit.xml" > "$OUT_DIR/pytest.log" 2>&1
status=$?
tail -n 40 "$OUT_DIR/pytest.log" | tee -a "$OUT_DIR/gpu_check.log"
log "pytest exit status $status"

log "benchmark (limit 150 s)"
timeout 150 "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" > "$OUT_DIR/bench.log" 2>&1
log "benchmark exit status $?"
tail -n 25 "$OUT_DIR/bench.log" | tee -a "$OUT_DIR/gpu_check.log"
log "done; results in $OUT_DIR"
exit $status
