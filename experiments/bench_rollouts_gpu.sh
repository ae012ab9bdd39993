#!/usr/bin/env bash
# On a lent H100/H200 (JAX with CUDA preinstalled, no network, no torch): decode
# correctness first (float32), then the llama_1b bf16 decode table at batch 1, 16, 64 and
# 256, 128-token prompts and 128 new tokens, each figure beside its memory-bandwidth bound.
# Every command is bounded by `timeout`; the whole script took about 5 minutes on an H100.
#
#   bash experiments/bench_rollouts_gpu.sh 2>&1 | tee gpu_rollouts.log
set -uo pipefail
cd "$(dirname "$0")/.." || exit
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 150 "$PY" experiments/gpu_decode_check.py || exit 1
timeout 210 "$PY" experiments/bench_decode.py --preset llama_1b --batch-size 1 16 64 256 \
  --context 128 --new-tokens 128 model.dtype=bfloat16 model.attention=xla
