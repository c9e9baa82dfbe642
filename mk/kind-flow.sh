#!/usr/bin/env bash
# The user's flow on a running cluster where `make kind-up` installed warren.
#   mk/kind-flow.sh demo   a burst of jobs; prints the QueueScaler and the workers as they move
#   mk/kind-flow.sh e2e    the same, asserted: scale-up, drain, nothing dead-lettered, scale-in
# Settings (environment): KUBE_CONTEXT (kind-warren), NAMESPACE (default), RELEASE (warren),
# KUBECTL, JOBS, DOTS, LOCAL_PORT, and the *_TIMEOUT values below (seconds).
#
# Every kubectl read goes through `try`: a transient API error is retried a few times and
# then ends the run through `fail` (message + diagnostics), never as a silent `set -e` exit
# from inside a command substitution. Anything else that fails unexpectedly gets the same
# through the ERR trap (inherited by functions and substitutions: set -E). A `fail` inside a
# substitution exits that subshell with REPORTED; the trap passes it up without reporting twice.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

KUBE_CONTEXT="${KUBE_CONTEXT:-kind-warren}"
NAMESPACE="${NAMESPACE:-default}"
RELEASE="${RELEASE:-warren}"
KUBECTL="${KUBECTL:-kubectl}"
LOCAL_PORT="${LOCAL_PORT:-18080}"
SCALER_MANIFEST="${SCALER_MANIFEST:-manifests/queuescaler.yaml}"
SCALE_UP_TIMEOUT="${SCALE_UP_TIMEOUT:-240}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-600}"
SCALE_IN_TIMEOUT="${SCALE_IN_TIMEOUT:-600}"

WORKER="$RELEASE-worker"
SENDER="$RELEASE-sender"
RABBIT_POD="$RELEASE-rabbitmq-0"
QUEUE="${QUEUE:-tasks}"

KUBECTL_ATTEMPTS="${KUBECTL_ATTEMPTS:-5}"

k() { "$KUBECTL" --context "$KUBE_CONTEXT" -n "$NAMESPACE" "$@"; }
log() { printf '\n== %s\n' "$*"; }
REPORTED=86
fail() {
  trap - ERR
  printf 'FAIL: %s\n' "$*" >&2
  diagnostics
  if [ "$BASH_SUBSHELL" -gt 0 ]; then exit "$REPORTED"; fi
  exit 1
}
on_error() {
  local rc="$1" line="$2"
  if [ "$rc" = "$REPORTED" ]; then
    trap - ERR
    if [ "$BASH_SUBSHELL" -gt 0 ]; then exit "$REPORTED"; fi
    exit 1
  fi
  fail "line $line: a command failed unexpectedly (exit $rc)"
}
trap 'on_error "$?" "$LINENO"' ERR

# try WHAT CMD...: runs CMD, retrying a failure (say a transient API error) up to
# KUBECTL_ATTEMPTS times; prints CMD's output on success, fails the run naming WHAT otherwise.
try() {
  local what="$1" out attempt
  shift
  for attempt in $(seq 1 "$KUBECTL_ATTEMPTS"); do
    if out="$("$@")"; then
      printf '%s' "$out"
      return 0
    fi
    echo "($what: attempt $attempt of $KUBECTL_ATTEMPTS failed)" >&2
    sleep 2
  done
  fail "$what failed $KUBECTL_ATTEMPTS times in a row"
}

diagnostics() {
  echo "--- diagnostics" >&2
  k get qs,deploy,sts,pods -o wide >&2 || true
  k get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 40 >&2 || true
  k logs "deploy/$RELEASE-controller" --tail=80 >&2 || true
}

PF_PID=""
stop_port_forward() { if [ -n "$PF_PID" ]; then kill "$PF_PID" 2>/dev/null || true; wait "$PF_PID" 2>/dev/null || true; PF_PID=""; fi; }
trap stop_port_forward EXIT

start_port_forward() {
  k port-forward "svc/$SENDER" "$LOCAL_PORT:80" >/dev/null 2>&1 &
  PF_PID=$!
  for _ in $(seq 1 60); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$LOCAL_PORT/healthz" 2>/dev/null; then return 0; fi
    kill -0 "$PF_PID" 2>/dev/null || break
    sleep 1
  done
  fail "port-forward to svc/$SENDER did not come up on 127.0.0.1:$LOCAL_PORT"
}

# Tokens are on by default (auth.enabled): send with a token created through warren-admin
# (none when the release runs without it).
send_auth=()
send_token() {
  local token
  k get deploy "$RELEASE-admin" >/dev/null 2>&1 || return 0
  k exec "deploy/$RELEASE-admin" -- warren-admin applications create kind-flow >/dev/null 2>&1 || true
  token="$(k exec "deploy/$RELEASE-admin" -- warren-admin tokens create --application kind-flow --secret-only 2>/dev/null || true)"
  if [ -n "$token" ]; then send_auth=(-H "Authorization: Bearer $token"); fi
}

# send_burst N DOTS: POST N jobs of DOTS dots (one second of work per dot); prints the 202 count.
send_burst() {
  local n="$1" dots="$2" accepted=0 code i suffix
  suffix="$(printf '%*s' "$dots" '' | tr ' ' '.')"
  send_token
  for i in $(seq 1 "$n"); do
    code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 15 "${send_auth[@]}" \
      -X POST "http://127.0.0.1:$LOCAL_PORT/send" -H 'Content-Type: application/json' \
      -d "{\"message\": \"burst job $i$suffix\"}" || echo 000)"
    if [ "$code" = 202 ]; then accepted=$((accepted + 1)); else echo "job $i: HTTP $code" >&2; fi
  done
  echo "$accepted"
}

worker_replicas() {
  try "reading deployment/$WORKER" k get deploy "$WORKER" -o jsonpath='{.spec.replicas}'
}

# Messages (ready + unacknowledged) in a queue, asked of RabbitMQ itself.
queue_messages() {
  local listing
  listing="$(try "listing the queues in $RABBIT_POD" k exec "$RABBIT_POD" -c rabbitmq -- \
    rabbitmqctl list_queues --quiet --no-table-headers name messages)"
  awk -v q="$1" '$1 == q { print $2; found = 1 } END { if (!found) print "absent" }' <<<"$listing"
}

# The example QueueScaler names the objects of the release "warren" (warren-worker,
# warren-rabbitmq); for another RELEASE the names are rewritten to "$RELEASE-...".
scaler_manifest() {
  if [ "$RELEASE" = warren ]; then
    cat "$SCALER_MANIFEST"
  else
    sed -E "s/(^|[^[:alnum:]_.-])warren-(worker|rabbitmq)([^[:alnum:]_-]|$)/\1$RELEASE-\2\3/g" "$SCALER_MANIFEST"
  fi
}

# The README's step: kubectl apply -f manifests/queuescaler.yaml. With the chart's own
# QueueScaler switched on (queueScaler.enabled), set SCALER_MANIFEST=none to keep it alone.
apply_scaler() {
  if [ "$SCALER_MANIFEST" = none ]; then
    log "SCALER_MANIFEST=none: using the QueueScaler the chart created"
  elif [ -f "$SCALER_MANIFEST" ]; then
    log "kubectl apply -f $SCALER_MANIFEST (release $RELEASE)"
    scaler_manifest | try "applying $SCALER_MANIFEST" k apply -f -
    echo
  else
    fail "$SCALER_MANIFEST not found"
  fi
  local scalers
  scalers="$(try "listing QueueScalers" k get qs -o name)"
  [ -n "$scalers" ] || fail "no QueueScaler in namespace $NAMESPACE"
  k get qs || true
}

demo() {
  local jobs="${JOBS:-30}" dots="${DOTS:-5}"
  apply_scaler
  start_port_forward
  log "sending $jobs jobs of $dots seconds each through svc/$SENDER"
  echo "accepted: $(send_burst "$jobs" "$dots")/$jobs"
  log "watching the QueueScaler and the workers (Ctrl-C to stop)"
  for _ in $(seq 1 "${DEMO_ROUNDS:-24}"); do
    date +%T
    k get qs --no-headers 2>/dev/null || true
    k get deploy "$WORKER" --no-headers
    sleep 5
  done
}

e2e() {
  local jobs="${JOBS:-40}" dots="${DOTS:-3}" start peak=0 replicas messages dead accepted
  apply_scaler
  start="$(worker_replicas)"
  log "workers before the burst: $start"
  start_port_forward
  log "sending $jobs jobs of $dots seconds each"
  accepted="$(send_burst "$jobs" "$dots")"
  [ "$accepted" = "$jobs" ] || fail "only $accepted of $jobs jobs were accepted with 202"
  echo "all $jobs accepted"

  log "waiting for the scale-up (more than one worker, at most ${SCALE_UP_TIMEOUT}s)"
  SECONDS=0
  while :; do
    replicas="$(worker_replicas)"
    [ "${replicas:-0}" -gt "$peak" ] && peak="$replicas"
    [ "${replicas:-0}" -gt 1 ] && break
    [ "$SECONDS" -lt "$SCALE_UP_TIMEOUT" ] || fail "workers stayed at ${replicas:-0}"
    sleep 2
  done
  echo "scaled up to $replicas workers after ${SECONDS}s"
  k get qs

  log "waiting for the queue to drain (at most ${DRAIN_TIMEOUT}s)"
  SECONDS=0
  while :; do
    messages="$(queue_messages "$QUEUE")"
    replicas="$(worker_replicas)"
    [ "${replicas:-0}" -gt "$peak" ] && peak="$replicas"
    [ "$messages" = 0 ] && break
    [ "$SECONDS" -lt "$DRAIN_TIMEOUT" ] || fail "queue $QUEUE still holds $messages messages"
    sleep 3
  done
  echo "queue $QUEUE drained after ${SECONDS}s (peak $peak workers)"
  dead="$(queue_messages "$QUEUE.dead")"
  [ "$dead" = 0 ] || [ "$dead" = absent ] || fail "$dead jobs were dead-lettered into $QUEUE.dead"

  log "waiting for the scale-in below the peak of $peak (at most ${SCALE_IN_TIMEOUT}s)"
  SECONDS=0
  while :; do
    replicas="$(worker_replicas)"
    [ "${replicas:-0}" -lt "$peak" ] && break
    [ "$SECONDS" -lt "$SCALE_IN_TIMEOUT" ] || fail "workers stayed at $replicas"
    sleep 5
  done
  echo "scaled in to $replicas workers after ${SECONDS}s"
  k get qs
  k get events --field-selector involvedObject.kind=QueueScaler 2>/dev/null | tail -n 10 || true
  log "e2e passed: $jobs jobs accepted and processed, peak $peak workers, none dead-lettered"
}

case "${1:-}" in
  demo) demo ;;
  e2e) e2e ;;
  *) echo "usage: $0 demo|e2e" >&2; exit 2 ;;
esac
