#!/usr/bin/env bash
# Create a TPU VM or pod slice.
#
#   tpu_setup/create.sh NAME ACCELERATOR [--spot | --queued] [--version RUNTIME] [--dry-run]
#
# ACCELERATOR is a Cloud TPU type: v5litepod-8 (one host), v5litepod-16 (4 hosts),
# v5p-8, v4-32, v6e-8, ... --spot makes a preemptible VM; --queued asks through a queued
# resource (waits for capacity, spot). ZONE and PROJECT come from the environment.
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODE=on-demand
VERSION=""
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --spot) MODE=spot ;;
    --queued) MODE=queued ;;
    --version) VERSION="$2"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -*) usage_error "unknown option $1" ;;
    *) positional+=("$1") ;;
  esac
  shift
done
[ ${#positional[@]} -eq 2 ] ||
  usage_error "usage: create.sh NAME ACCELERATOR [--spot|--queued] [--dry-run]"
NAME="${positional[0]}"
ACCELERATOR="${positional[1]}"
if [ -z "$VERSION" ]; then
  case "$ACCELERATOR" in
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

common=(--zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION")
if [ -n "$PROJECT" ]; then common+=("$(project_flag)"); fi
case "$MODE" in
  on-demand) run gcloud compute tpus tpu-vm create "$NAME" "${common[@]}" ;;
  spot) run gcloud compute tpus tpu-vm create "$NAME" "${common[@]}" --spot ;;
  queued)
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" --spot
    run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
      --format='value(state.state)'
    ;;
esac
