#!/usr/bin/env bash
# Set up, then train a small model end to end on Python's own docs (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/quickstart.py "$@"
