#!/usr/bin/env bash
# Set up, then run a small model's whole life on this CPU (no download): pre-training on
# Python's own docs -> SFT -> simulated labels -> reward model -> PPO, and GRPO from SFT,
# with a report.
# Extra arguments are overrides (stages=[pretrain] for the pre-training quick start alone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core  # the library alone; scripts/test.sh installs the rest
exec .venv/bin/jaxllm pipeline --config experiments/configs/quickstart.yaml "$@"
