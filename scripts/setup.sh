#!/usr/bin/env bash
# Create .venv (if missing) and install jaxllm with its dev tools and the HF parity tests'
# transformers + CPU torch, pinned to the tested stack.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[dev,hf-test]"
