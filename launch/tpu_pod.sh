#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, copy this repo to every worker, install `.[tpu]`, start
# `lexvla train` on all workers at once (`config.dist.mode=auto`, checkpoints in a gs:// workdir),
# stream worker 0's log, then delete the slice.
#
#   launch/tpu_pod.sh --name lexvla-v5p --zone us-east5-a --accelerator-type v5p-64 \
#       --workdir gs://BUCKET/lexvla/run1 [--spot] [--queued] [--restarts N] [--keep] [--dry-run] \
#       -- --config.model.text_checkpoint=/ckpt/Llama-2-7b-hf ...
#
# Training runs detached on the workers (nohup), so a dropped connection does not stop it: the log stream
# reconnects (RECONNECTS times, RECONNECT_WAIT_S apart; then the slice is kept). Otherwise the slice is
# deleted when this script exits, also on Ctrl-C or an error (checkpoints stay in the workdir; run again
# to resume), unless --keep is given. --dry-run prints every command and runs none.
#
# With --restarts N, a preempted slice (during creation or training) or a training run that exits non-zero
# (but not 2, a configuration error, which a restart would repeat) is deleted and created again, and training
# resumes from the workdir's checkpoints, up to N times; each restart is logged with its reason.
set -euo pipefail

SCRIPT_NAME=tpu_pod.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE --workdir gs://BUCKET/DIR
                         [--project P] [--version IMAGE] [--config FILE] [--spot] [--queued] [--restarts N]
                         [--keep] [--dry-run] [-- LEXVLA_TRAIN_ARGS...]
  --accelerator-type   e.g. v4-32, v5litepod-16, v5p-64, v6e-16
  --version            TPU VM image (default: chosen from the accelerator type)
  --config             config file, relative to the repo (default configs/lexvla_cc12m.py)
  --spot               Spot TPU VMs (cheaper; may be preempted: the run resumes from its checkpoints)
  --queued             request the slice through a queued resource and wait until it is ACTIVE
  --restarts N         on preemption or a failed run (not a config error): re-create the slice and resume,
                       up to N times (default 0)
  --keep               leave the slice running afterwards (default: delete it)
  --dry-run            print every command, run none
Arguments after `--` go to `lexvla train` (e.g. --config.data.train_shards=...).
EOF
}

NAME="" ZONE="" TYPE="" WORKDIR="" PROJECT="" VERSION="" CONFIG="configs/lexvla_cc12m.py"
RECONNECTS="${RECONNECTS:-5}" RECONNECT_WAIT_S="${RECONNECT_WAIT_S:-30}"
SPOT=0 QUEUED=0 KEEP=0 RESTARTS=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --keep) KEEP=1; shift ;;
    --restarts) need_value "$@"; RESTARTS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$TYPE" ]] || die "--accelerator-type is required (e.g. v5p-64)"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path every worker can write (got '${WORKDIR}')"
[[ -f "$REPO/$CONFIG" || -f "$REPO/${CONFIG%%:*}" ]] || die "config $CONFIG not found in $REPO"
[[ "$RESTARTS" =~ ^[0-9]+$ ]] || die "--restarts must be a number (got '${RESTARTS}')"

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default image for $TYPE; pass --version" ;;
  esac
fi
require_command gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk)"

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
SPOT_FLAG=()
[[ "$SPOT" == 1 ]] && SPOT_FLAG=(--spot)
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

if [[ "$QUEUED" == 1 ]]; then
  DELETE=("${QR[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet)
else
  DELETE=("${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet)
fi
PREEMPTED=3 # what the steps below return when the slice went away under them

delete_slice() {
  local status=$?
  if [[ "$KEEP" == 1 ]]; then
    echo "$SCRIPT_NAME: keeping $NAME; delete it with: $(quote "${DELETE[@]}")" >&2
  else
    run "${DELETE[@]}" || echo "$SCRIPT_NAME: deleting $NAME failed; run: $(quote "${DELETE[@]}")" >&2
  fi
  exit "$status"
}

# The slice's state as gcloud reports it (READY, PREEMPTED, ...; the queued resource's when --queued), or GONE.
slice_state() {
  if [[ "$QUEUED" == 1 ]]; then
    "${QR[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format="value(state.state)" 2>/dev/null || echo GONE
  else
    "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format="value(state)" 2>/dev/null || echo GONE
  fi
}

slice_lost() {
  case "$(slice_state)" in
    PREEMPTED | TERMINATED | SUSPENDED | SUSPENDING | FAILED | GONE) return 0 ;;
    *) return 1 ;;
  esac
}

wait_until_active() {
  local describe=("${QR[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format="value(state.state)")
  run "${describe[@]}"
  [[ "$DRY_RUN" == 1 ]] && return 0
  local state
  while true; do
    state="$("${describe[@]}")"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) echo "$SCRIPT_NAME: queued resource $NAME is $state" >&2; return "$PREEMPTED" ;;
      *) echo "$SCRIPT_NAME: $NAME is $state; waiting" >&2; sleep "${QUEUED_POLL_S:-30}" ;;
    esac
  done
}

# 1. The slice.
create_slice() {
  if [[ "$QUEUED" == 1 ]]; then
    run "${QR[@]}" create "$NAME" --node-id="$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$TYPE" \
      --runtime-version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} || return "$PREEMPTED"
    wait_until_active
  else
    run "${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$TYPE" --version="$VERSION" \
      ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"} || return "$PREEMPTED"
  fi
}

# 2. The code on every worker, installed with the TPU extra (Python 3.11 from the image's apt sources).
TARBALL="${TMPDIR:-/tmp}/lexvla-$NAME.tar.gz"
INSTALL="set -e; sudo apt-get update -qq; sudo apt-get install -y -qq python3.11 python3.11-venv"
INSTALL+="; rm -rf ~/lexvla; mkdir -p ~/lexvla; tar -xzf ~/lexvla.tar.gz -C ~/lexvla; cd ~/lexvla"
INSTALL+="; python3.11 -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e '.[tpu]'"
install_code() {
  run "${TPU[@]}" scp "$TARBALL" "$NAME:lexvla.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all &&
    run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$INSTALL"
}

# 3. Training on all workers at once, detached; its exit status lands in train.rc.
TRAIN="$(quote .venv/bin/lexvla train --config "$CONFIG" --workdir "$WORKDIR" --config.dist.mode=auto \
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})"
START="cd ~/lexvla && rm -f train.rc && nohup bash -c $(quote "$TRAIN; echo \$? > train.rc")"
START+=' > train.log 2>&1 < /dev/null & echo $! > ~/lexvla/train.pid'

# 4. Worker 0's log until its process ends. A dropped connection reattaches (the log starts over); a slice
# that went away returns PREEMPTED; after RECONNECTS failures the slice is kept, since training goes on.
# shellcheck disable=SC2016  # expanded on the worker
STREAM='tail -n +1 -f --pid="$(cat ~/lexvla/train.pid)" ~/lexvla/train.log'
stream_log() {
  local tries=0
  until run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 --command="$STREAM"; do
    slice_lost && return "$PREEMPTED"
    tries=$((tries + 1))
    if [[ "$tries" -ge "$RECONNECTS" ]]; then
      KEEP=1
      die "lost worker 0's log $tries times; training goes on, so $NAME is kept (its log: ~/lexvla/train.log)"
    fi
    echo "$SCRIPT_NAME: lost worker 0's log; reconnecting in ${RECONNECT_WAIT_S}s" >&2
    sleep "$RECONNECT_WAIT_S"
  done
}

# 5. Every worker's exit status: 0 when all are; else 2 (a configuration error) when a worker had it, else the
# highest, else PREEMPTED when the slice went away.
# shellcheck disable=SC2016  # expanded on the worker
STATUS='rc="$(cat ~/lexvla/train.rc 2>/dev/null || echo 1)"; echo "lexvla-train-rc=$rc"; exit "$rc"'
train_status() {
  local out codes code worst=1
  if out="$(run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$STATUS")"; then
    echo "$out"
    return 0
  fi
  echo "$out"
  codes="$(sed -n 's/.*lexvla-train-rc=\([0-9]*\).*/\1/p' <<<"$out")"
  for code in $codes; do
    [[ "$code" == 2 ]] && return 2
    [[ "$code" -gt "$worst" ]] && worst="$code"
  done
  [[ -z "$codes" ]] && slice_lost && return "$PREEMPTED"
  return "$worst"
}

trap delete_slice EXIT
restart=0
while true; do
  status=0
  if create_slice; then
    if [[ "$restart" == 0 ]]; then
      run tar -czf "$TARBALL" -C "$REPO" --exclude-vcs --exclude=./.venv --exclude=./.ci-venv --exclude=./runs \
        --exclude=./data --exclude=./workdir --exclude=__pycache__ --exclude='*.egg-info' .
    fi
    { install_code && run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$START" &&
      stream_log && train_status; } || status=$?
    if [[ "$status" != 0 && "$status" != 2 && "$status" != "$PREEMPTED" ]] && slice_lost; then
      status="$PREEMPTED"
    fi
  else
    status=$?
  fi
  case "$status" in
    0) exit 0 ;;
    2) echo "$SCRIPT_NAME: lexvla train stopped on a configuration error (exit 2); not restarting" >&2; exit 2 ;;
    "$PREEMPTED") reason="the slice was preempted or could not be created" ;;
    *) reason="lexvla train exited $status" ;;
  esac
  if [[ "$restart" -ge "$RESTARTS" ]]; then
    echo "$SCRIPT_NAME: $reason; no restarts left (--restarts $RESTARTS)" >&2
    exit 1
  fi
  restart=$((restart + 1))
  echo "$SCRIPT_NAME: $reason; restart $restart of $RESTARTS: re-creating $NAME, resuming from $WORKDIR" >&2
  run "${DELETE[@]}" || true
done
