#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM and install jaxllm with the TPU extra.
#
#   tpu_setup/install.sh NAME [--dry-run]
set -euo pipefail
source "$(dirname "$0")/common.sh"

NAME=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -*) usage_error "unknown option $1" ;;
    *) [ -z "$NAME" ] || usage_error "one NAME only"; NAME="$1" ;;
  esac
  shift
done
[ -n "$NAME" ] || usage_error "usage: install.sh NAME [--dry-run]"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ARCHIVE="$(mktemp -d)/jaxllm.tar.gz"

run git -C "$ROOT" archive --format=tar.gz --prefix="$REPO_DIR/" -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:~/" --worker=all --zone="$ZONE"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone="$ZONE" --command="\
rm -rf ~/$REPO_DIR && tar xzf ~/jaxllm.tar.gz -C ~ && cd ~/$REPO_DIR && \
python3 -m pip install --quiet --upgrade pip && \
python3 -m pip install --quiet -e '.[tpu,hf]' && \
python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0])'"
