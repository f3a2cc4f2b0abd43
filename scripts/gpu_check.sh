#!/usr/bin/env bash
# One GPU check that fits a 10-minute call on a single-GPU machine with PyTorch + torchvision but no Ray,
# no MLflow and no package index:
#   1. the GPU-marked tests (tests/test_gpu.py) — with pytest when it imports, else as a plain script;
#   2. Ray-free Learner steps of the smoke and cifar10 shapes in bf16 with torch.compile, generation in
#      the three modes and the evaluation metrics (scripts/gpu_check.py; random images of each shape);
#   3. scripts/bench_step.py on the cifar10 config: reference vs project, every speed setting.
# Writes DIR/gpu_check.log, DIR/gpu_check.json (figures of 2) and DIR/bench.json (figures of 3), with
# DIR = $1, else $OUT, else runs/gpu_check. Each part has its own time limit, so a slow part cannot take
# the others' time; the exit status is non-zero when any part failed.
#   scripts/gpu_check.sh "$OUT"
# Knobs (environment): PYTHON (python3), DEVICE (auto), SMOKE_STEPS (300), CIFAR_STEPS (100),
# CIFAR_CONFIG (tune_configs/cifar10.yaml), PRECISION (bf16), COMPILE (true), BENCH_STEPS (5), BENCH_WARMUP (2), BENCH_VARIANTS (every),
# T_TESTS (120), T_STEPS (220), T_BENCH (200) seconds (540 in all, inside a 600-second call).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
LOG="$DIR/gpu_check.log"
status=0

run() {  # run LABEL SECONDS CMD...: time-limited, logged, failure remembered
  local label=$1 limit=$2; shift 2
  echo "=== $label (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $label: rc $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

{
  echo "=== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("torchvision", "ray", "mlflow", "torch_fidelity", "pytest", "numpy", "yaml"):
    print(f"  {m}: {'present' if importlib.util.find_spec(m) else 'absent'}")
PY
  if "$PY" -c "import pytest" 2>/dev/null; then
    run "gpu tests (pytest -m gpu)" "${T_TESTS:-120}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  else
    echo "pytest is not importable here: running tests/test_gpu.py as a script (same checks, no pytest)"
    run "gpu tests (script)" "${T_TESTS:-120}" "$PY" tests/test_gpu.py
  fi
  run "Ray-free Learner steps, generation, metrics" "${T_STEPS:-220}" "$PY" scripts/gpu_check.py --out "$DIR" \
    --device "${DEVICE:-auto}" --smoke-steps "${SMOKE_STEPS:-300}" --cifar-steps "${CIFAR_STEPS:-100}" \
    --cifar-config "${CIFAR_CONFIG:-tune_configs/cifar10.yaml}" --precision "${PRECISION:-bf16}" --compile "${COMPILE:-true}"
  run "bench_step.py" "${T_BENCH:-200}" "$PY" scripts/bench_step.py --config "${CIFAR_CONFIG:-tune_configs/cifar10.yaml}" \
    --device "${DEVICE:-auto}" --data synthetic --steps "${BENCH_STEPS:-5}" --warmup "${BENCH_WARMUP:-2}" \
    --variants "${BENCH_VARIANTS:-every}" --json "$DIR/bench.json"
  echo "=== gpu_check done: status $status"
  exit "$status"  # leaves this group (a subshell of the pipe), whose status PIPESTATUS reports
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
