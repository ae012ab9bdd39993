#!/usr/bin/env bash
# Run the same command on every worker of a TPU VM, gather each worker's log, and rerun
# after a preemption (the run resumes from its newest checkpoint).
#
#   tpu_setup/run.sh NAME [--retries N] [--dry-run] -- jaxllm pretrain --config FILE ...
#
# Each worker logs to ~/run.log; the logs land in ./logs/NAME/worker-<i>.log. A run stopped
# by SIGTERM (exit 143, preemption notice) or a lost connection is started again up to N
# times (default 3) once the VM answers: jaxllm resumes from out_dir, so the output of the
# retried run continues the first.
set -euo pipefail
source "$(dirname "$0")/common.sh"

NAME=""
RETRIES=3
while [ $# -gt 0 ]; do
  case "$1" in
    --retries) RETRIES="$2"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    -*) usage_error "unknown option $1 (put the command after --)" ;;
    *) [ -z "$NAME" ] || usage_error "one NAME only (put the command after --)"; NAME="$1" ;;
  esac
  shift
done
[ -n "$NAME" ] || usage_error "usage: run.sh NAME [--retries N] [--dry-run] -- COMMAND..."
[ $# -ge 1 ] || usage_error "no command given after --"
printf -v COMMAND ' %q' "$@"
REMOTE="cd ~/$REPO_DIR && (${COMMAND# }) 2>&1 | tee -a ~/run.log; exit \${PIPESTATUS[0]}"

gather_logs() {
  mkdir -p "logs/$NAME"
  local workers
  workers="$(gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
    --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)"
  for ((i = 0; i < ${workers:-1}; i++)); do
    run gcloud compute tpus tpu-vm scp "$NAME:~/run.log" "logs/$NAME/worker-$i.log" \
      --worker="$i" --zone="$ZONE" || true
  done
}

attempt=0
while true; do
  status=0
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone="$ZONE" \
    --command="$REMOTE" || status=$?
  if [ "$DRY_RUN" = "1" ]; then
    echo "+ (dry run: logs would be gathered into logs/$NAME/worker-<i>.log)"
    exit 0
  fi
  gather_logs
  if [ "$status" -eq 0 ]; then
    exit 0
  fi
  attempt=$((attempt + 1))
  if [ "$attempt" -gt "$RETRIES" ]; then
    echo "error: the run failed $attempt times (last status $status); see logs/$NAME" >&2
    exit "$status"
  fi
  echo "run stopped with status $status (preempted?); retry $attempt of $RETRIES" >&2
  until gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
    --format='value(state)' | grep -q READY; do
    sleep 60
  done
done
