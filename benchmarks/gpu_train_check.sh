#!/usr/bin/env bash
# The training stack on one CUDA GPU: bf16 training, exact-resume plumbing, torch.compile, compare.
#
# Every step runs even when one before it failed, and the script exits 1 naming the failed steps.
set -euo pipefail
out=${OUT:-.}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MMREC_DATA_CACHE=/tmp/mmrec-cache
r=/tmp/gpu_runs
rm -rf "$r"
common="--device cuda --seq-len 2048 --batch-size 16 --eval-every 40 --checkpoint-every 40 --log-every 20 --sample-tokens 64"
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
only() { grep -E "$1" || true; }
skip() { grep -v "$1" || true; }

# shellcheck disable=SC2086  # $common is a list of flags
train_eager() { timeout 150 python -m mmrec train $common --max-steps 80 --out $r/eager 2>&1 | skip "^prepare" | tail -12; }
# shellcheck disable=SC2086
train_resume() {
  timeout 90 python -m mmrec train $common --max-steps 100 --out $r/eager --resume auto 2>&1 \
    | only "resume|step +100|done|validation"
}
# shellcheck disable=SC2086
train_compiled() {
  timeout 170 python -m mmrec train $common --max-steps 80 --compile --track-stages --out $r/compiled 2>&1 \
    | only "step|done|error|Error" | tail -6
}
# shellcheck disable=SC2086
train_llama() {
  timeout 90 python -m mmrec train $common --max-steps 60 --arch transformer --preset llama --no-track-stages \
    --out $r/llama 2>&1 | only "step +60|done|validation"
}

step "train (bf16, builtin corpus, 5.2M params, 2048-token windows)" train_eager
step "resume to 100" train_resume
step "compiled" train_compiled
step "llama baseline" train_llama

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" | tee "$out/failed.txt" >&2
  exit 1
fi
echo "all steps passed"
