#!/usr/bin/env bash
# One prepared run on a CUDA machine: correctness on CUDA (float32 and bf16),
# then the mixer and model benchmarks in bf16. Writes logs to ${OUT:-.}.
# Usage: bash benchmarks/gpu_check.sh
#
# Every step runs even when one before it failed (the logs of all are wanted from one device run), and
# the script exits 1 naming the failed steps: a failing GPU test or benchmark fails the script.
set -euo pipefail
out=${OUT:-.}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
failed=()

# step NAME COMMAND...: run a command (a pipeline's status under pipefail), record its failure by name.
step() {
  local name=$1
  shift
  echo "== $name"
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc)" >&2
    failed+=("$name (exit $rc)")
  fi
}

# Filters after a command must not decide its status: grep finding no line is not a failure.
keep_lines() { grep -v "$1" || true; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

run_tests() { timeout 240 python -m pytest -q -x -p no:cacheprovider 2>&1 | tail -6 | tee "$out/tests.txt"; }
run_mixer() { timeout 120 python benchmarks/bench_mixer.py --device cuda --chunk 64 128 2>&1 | tee "$out/mixer.txt"; }
run_core() {
  timeout 200 python benchmarks/bench_core.py --device cuda --lengths 2048 8192 32768 65536 --tokens 65536 \
    --steps 5 --contexts 1024 32768 2>&1 | tee "$out/core.txt"
}
run_compile() {
  timeout 120 python benchmarks/bench_mixer.py --device cuda --chunk 64 --lengths 8192 65536 --compile 2>&1 \
    | keep_lines Warn | tail -8 | tee "$out/compile.txt"
}

step "tests (CPU suite on this torch + CUDA device tests)" run_tests
step "mixer benchmark" run_mixer
step "model benchmark" run_core
step "torch.compile probe" run_compile

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" | tee "$out/failed.txt" >&2
  exit 1
fi
echo "all steps passed"
