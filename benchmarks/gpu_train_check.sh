#!/usr/bin/env bash
# The training stack on one CUDA GPU: bf16 training, exact-resume plumbing, torch.compile, compare.
set -u
out=${OUT:-.}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MMREC_DATA_CACHE=/tmp/mmrec-cache
r=/tmp/gpu_runs; rm -rf $r
common="--device cuda --seq-len 2048 --batch-size 16 --eval-every 40 --checkpoint-every 40 --log-every 20 --sample-tokens 64"
echo "== train (bf16, builtin corpus, 5.2M params, 2048-token windows)"
timeout 150 python -m mmrec train $common --max-steps 80 --out $r/eager 2>&1 | grep -v "^prepare" | tail -12
echo "== resume to 100"
timeout 90 python -m mmrec train $common --max-steps 100 --out $r/eager --resume auto 2>&1 | grep -E "resume|step +100|done|validation"
echo "== compiled"
timeout 170 python -m mmrec train $common --max-steps 80 --compile --track-stages --out $r/compiled 2>&1 | grep -E "step|done|error|Error" | tail -6
echo "== llama baseline"
timeout 90 python -m mmrec train $common --max-steps 60 --arch transformer --preset llama --no-track-stages --out $r/llama 2>&1 | grep -E "step +60|done|validation"
