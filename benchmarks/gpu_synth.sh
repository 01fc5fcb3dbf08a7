#!/usr/bin/env bash
# The synthetic long-context tasks on one CUDA GPU (issue 5), four jobs at once (small models are
# launch-bound, so they share the GPU well): MQAR at the Zoology setting (512 tokens, 64 key-value
# pairs, vocabulary 8192, width 128, 2 layers) for MM-Rec (one 128-wide head; two 64-wide heads) and
# the LLaMA-style baseline, and induction heads for MM-Rec trained at 256 tokens and tested to 64K.
# Each job trains inside MINUTES (its schedule fitted to the budget). Results go to ${OUT:-.}.
set -u
out=${OUT:-.}
runs=${RUNS:-/tmp/synth_runs}
rm -rf "$runs" && mkdir -p "$runs"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}
M=${MINUTES:-5.5}
mq="--seq-len ${SEQ:-512} --kv-pairs ${KV:-64} --vocab-size ${VOCAB:-8192} --d-model ${WIDTH:-128} --n-layers 2
    --batch-size ${BATCH:-64} --steps 100000 --max-minutes $M --device $dev --log-every 500"
[ "$dev" = cuda ] && nvidia-smi --query-gpu=name --format=csv,noheader
python -m mmrec synth mqar --arch mmrec --n-heads 1 --lr 3e-3 $mq --out "$runs/mqar_mmrec_1head" \
  > "$runs/mqar_mmrec_1head.log" 2>&1 &
python -m mmrec synth mqar --arch mmrec --n-heads 2 --lr 1e-3 $mq --out "$runs/mqar_mmrec_2heads" \
  > "$runs/mqar_mmrec_2heads.log" 2>&1 &
python -m mmrec synth mqar --arch llama --n-heads 2 --lr 1e-3 $mq --out "$runs/mqar_llama" \
  > "$runs/mqar_llama.log" 2>&1 &
python -m mmrec synth induction --arch mmrec --train-len ${TRAIN_LEN:-256} --test-lens ${TEST_LENS:-256 1024 4096 16384 65536} \
  --steps 100000 --max-minutes "$M" --batch-size ${BATCH:-64} --lr 2e-3 --device "$dev" --log-every 500 \
  --out "$runs/induction_mmrec" > "$runs/induction_mmrec.log" 2>&1 &
wait
for r in "$runs"/*/; do echo "## $(basename "$r")"; cat "$r/results.md" 2>/dev/null || echo "(no results)"; echo; done \
  > "$out/summary.md"
python - "$runs" "$out/results.json" <<'PY'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
found = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/results.json")}
pathlib.Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
PY
for f in "$runs"/*.log; do echo "== $f"; grep -v "^step" "$f" | tail -n 15; grep "^step" "$f" | tail -n 3; done > "$out/logs.txt"
cat "$out/summary.md"
