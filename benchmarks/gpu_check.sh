#!/usr/bin/env bash
# One prepared run on a CUDA machine: correctness on CUDA (float32 and bf16),
# then the mixer and model benchmarks in bf16. Writes logs to ${OUT:-.}.
# Usage: bash benchmarks/gpu_check.sh
set -u
out=${OUT:-.}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== tests (CPU suite on this torch + CUDA device tests)"
timeout 240 python -m pytest -q -x -p no:cacheprovider 2>&1 | tail -6 | tee "$out/tests.txt"
echo "== mixer benchmark"
timeout 120 python benchmarks/bench_mixer.py --device cuda --chunk 64 128 2>&1 | tee "$out/mixer.txt"
echo "== model benchmark"
timeout 200 python benchmarks/bench_core.py --device cuda --lengths 2048 8192 32768 65536 --tokens 65536 \
  --steps 5 --contexts 1024 32768 2>&1 | tee "$out/core.txt"
echo "== torch.compile probe"
timeout 120 python benchmarks/bench_mixer.py --device cuda --chunk 64 --lengths 8192 65536 --compile \
  2>&1 | grep -v Warn | tail -8 | tee "$out/compile.txt"
