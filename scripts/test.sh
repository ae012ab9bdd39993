#!/usr/bin/env bash
# Set up, lint, then run the whole test suite on CPU (8 virtual devices; see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the dev tools (ruff, shellcheck) the tests call
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
