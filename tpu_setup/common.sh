#!/usr/bin/env bash
# Shared by the tpu_setup scripts: argument defaults and a dry-run aware runner.
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

DRY_RUN="${DRY_RUN:-0}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
REPO_DIR="${REPO_DIR:-jaxllm}"

# run CMD...: print the command (quoted, as it would run); run it unless DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" != "1" ]; then
    "$@"
  fi
}

project_flag() {
  if [ -n "$PROJECT" ]; then
    printf -- '--project=%s' "$PROJECT"
  fi
}

usage_error() {
  echo "error: $1" >&2
  exit 2
}
