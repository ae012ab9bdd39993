#!/usr/bin/env bash
# On a lent H100/H200 (JAX with CUDA preinstalled, no network, no torch), in one call of
# at most 10 minutes, most important first:
#   1. decode correctness (float32): gpu_decode_check.py;
#   2. the llama_1b bf16 decode table at batch 1, 16, 64 and 256, 128-token prompts and
#      128 new tokens, each figure beside its memory-bandwidth bound;
#   3. at batch 64, what bounds a step: the same steps driven from Python, one compiled
#      call per token (`--loop host`); the while loop with XLA's command buffers (CUDA
#      graphs) turned off; a profile of one call (kernels per step, their time per step
#      against the wall time per step).
# Every command is bounded by `timeout`; a compilation cache shares compiles between them.
#
#   bash experiments/bench_rollouts_gpu.sh 2>&1 | tee gpu_rollouts.log
#
# PRESET, CONTEXT, NEW_TOKENS, BATCHES and PROBE_BATCH change the shapes (the test suite
# runs it on the CPU with the tiny preset).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm_jax_cache}"
PY="${PYTHON:-python3}"
PRESET="${PRESET:-llama_1b}" CONTEXT="${CONTEXT:-128}" NEW_TOKENS="${NEW_TOKENS:-128}"
read -r -a BATCHES <<< "${BATCHES:-1 16 64 256}"
PROBE_BATCH="${PROBE_BATCH:-64}"
SHAPE=(--preset "$PRESET" --context "$CONTEXT" --new-tokens "$NEW_TOKENS")
MODEL=(model.dtype=bfloat16 model.attention=xla)  # overrides: after a one-value option
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 100 "$PY" experiments/gpu_decode_check.py || exit 1
timeout 200 "$PY" experiments/bench_decode.py --batch-size "${BATCHES[@]}" "${SHAPE[@]}" "${MODEL[@]}"
echo "## batch $PROBE_BATCH, one compiled call per token"
timeout 90 "$PY" experiments/bench_decode.py --batch-size "$PROBE_BATCH" --loop host "${SHAPE[@]}" \
  "${MODEL[@]}"
echo "## batch $PROBE_BATCH, while loop, command buffers off"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout 90 "$PY" \
  experiments/bench_decode.py --batch-size "$PROBE_BATCH" "${SHAPE[@]}" "${MODEL[@]}"
echo "## batch $PROBE_BATCH, profile of one call"
timeout 90 "$PY" experiments/profile_decode.py --preset "$PRESET" --batch-size "$PROBE_BATCH" \
  --prompt-len "$CONTEXT" --new-tokens "$NEW_TOKENS" --top 25 "${MODEL[@]}"
