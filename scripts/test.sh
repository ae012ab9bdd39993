#!/usr/bin/env bash
# Set up, lint, then run the whole test suite on CPU (8 virtual devices; see tests/conftest.py),
# in two processes (JAXLLM_TEST_WORKERS; each test file stays in one, so its fixtures are made once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the dev tools (ruff, shellcheck) the tests call
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n "${JAXLLM_TEST_WORKERS:-2}" --dist loadfile "$@"
