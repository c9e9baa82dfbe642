#!/usr/bin/env bash
# The local cluster's lifecycle, called by mk/local.mk (make local-up / local-down / local-test).
#   up     start localcluster in the background (unless it already runs), wait for the
#          apiserver and the node, helm upgrade --install the chart with --wait
#   down   SIGTERM localcluster (it stops its pods), wait, remove the state directory
#   test   the README flow end to end, asserted (mk/local_e2e.py)
# Settings come from mk/local.mk through the environment (LOCAL_STATE, LOCAL_BIN, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${LOCAL_STATE:?}" "${LOCAL_BIN:?}" "${LOCAL_PID:?}" "${LOCAL_LOG:?}" "${KUBECONFIG:?}"
HELM="${HELM:-helm}"
KUBECTL="${KUBECTL:-kubectl}"
RELEASE="${RELEASE:-warren}"
NAMESPACE="${NAMESPACE:-default}"
CHART_DIR="${CHART_DIR:-charts/warren}"
LOCAL_HELM_TIMEOUT="${LOCAL_HELM_TIMEOUT:-5m}"
export KUBECONFIG

log() { printf '== %s\n' "$*"; }
k() { "$KUBECTL" "$@"; }

running() {
  [ -f "$LOCAL_PID" ] && kill -0 "$(cat "$LOCAL_PID")" 2>/dev/null
}

show_log() {
  echo "--- last lines of $LOCAL_LOG" >&2
  tail -n 40 "$LOCAL_LOG" >&2 || true
}

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every second, print progress every 10s.
wait_for() {
  local timeout="$1" what="$2" start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    running || { echo "localcluster exited while waiting for $what" >&2; show_log; exit 1; }
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
      echo "$what not reached after ${timeout}s" >&2; show_log; exit 1
    fi
    [ $(((SECONDS - start) % 10)) = 0 ] && [ $((SECONDS - start)) -gt 0 ] && echo "   ... waiting for $what ($((SECONDS - start))s)"
    sleep 1
  done
}

node_ready() {
  [ "$(k get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{end}')" = True ]
}

up() {
  local t0=$SECONDS
  mkdir -p "$LOCAL_STATE/logs"
  if running; then
    log "localcluster already running (pid $(cat "$LOCAL_PID")), state in $LOCAL_STATE"
  else
    # Pods run their programs as the chart's non-root users, by path, after their volumes
    # are mounted: cargo's target dir may sit under a private home directory, and a chart
    # volume at /tmp (RabbitMQ's, PostgreSQL's) hides a clone under /tmp. So warren's
    # binaries and the image entrypoints (localcluster/images) are staged in LOCAL_POD_FILES.
    local pod_files="${LOCAL_POD_FILES:-/var/lib/warren-localcluster}"
    install -d -m 0755 "$pod_files" "$pod_files/bin" "$pod_files/images"
    install -m 0755 "$(dirname "${LOCAL_IMAGE_MAP:-localcluster/images.yaml}")"/images/* "$pod_files/images/"
    export LOCALCLUSTER_DIR="$pod_files"
    if [ -n "${WARREN_BIN_DIR:-}" ]; then
      for b in "$WARREN_BIN_DIR"/warren-*; do
        [ -f "$b" ] && [ -x "$b" ] && install -m 0755 "$b" "$pod_files/bin/"
      done
      WARREN_BIN_DIR="$pod_files/bin"
    fi
    log "starting localcluster ($("$LOCAL_BIN" version)) in the background; log: $LOCAL_LOG"
    # setsid: its own session, so a Ctrl-C in this terminal does not stop it.
    WARREN_BIN_DIR="${WARREN_BIN_DIR:-}" setsid "$LOCAL_BIN" up --state-dir "$LOCAL_STATE" \
      --image-map "${LOCAL_IMAGE_MAP:-localcluster/images.yaml}" >>"$LOCAL_LOG" 2>&1 </dev/null &
    echo $! >"$LOCAL_PID"
  fi
  wait_for 180 "kube-apiserver /readyz" k get --raw /readyz
  log "kube-apiserver ready after $((SECONDS - t0))s: $(k version -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -n1)"
  wait_for 120 "node Ready" node_ready
  log "node $(k get nodes -o jsonpath='{.items[0].metadata.name}') Ready after $((SECONDS - t0))s"
  log "helm upgrade --install $RELEASE $CHART_DIR --wait"
  local -a extra=()
  # HELM_ARGS: extra flags, split on spaces (e.g. HELM_ARGS='--set queue.type=classic').
  read -r -a extra <<<"${HELM_ARGS:-}"
  "$HELM" upgrade --install "$RELEASE" "$CHART_DIR" --namespace "$NAMESPACE" --create-namespace \
    --wait --timeout "$LOCAL_HELM_TIMEOUT" "${extra[@]}"
  k -n "$NAMESPACE" get pods -o wide
  log "chart Ready $((SECONDS - t0))s after make local-up started the cluster step"
  cat <<NEXT

Next:
  export KUBECONFIG=$KUBECONFIG
  kubectl apply -f manifests/queuescaler.yaml
  kubectl port-forward svc/$RELEASE-sender 8080:80 &
  curl -X POST localhost:8080/send -H 'Content-Type: application/json' -d '{"message": "hello..."}'
  kubectl get qs -w
  helm test $RELEASE
  make local-down        # stop everything, delete $LOCAL_STATE
NEXT
}

down() {
  if running; then
    local pid
    pid="$(cat "$LOCAL_PID")"
    log "stopping localcluster (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "localcluster still running after 60s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "localcluster not running"
  fi
  rm -rf "$LOCAL_STATE"
  log "removed $LOCAL_STATE"
}

# make local-e2e (and so make test) needs a cluster of its own, started fresh: it
# refuses to take over or tear down one that `make local-up` left running.
fresh() {
  if running; then
    echo "a local cluster is already running (pid $(cat "$LOCAL_PID"), state in $LOCAL_STATE)." >&2
    echo "make local-e2e starts and removes its own; stop this one first: make local-down" >&2
    exit 1
  fi
  rm -rf "$LOCAL_STATE"
}

case "${1:-}" in
  up) up ;;
  fresh) fresh ;;
  down) down ;;
  test) python3 mk/local_e2e.py ;;
  *) echo "usage: $0 up|down|test|fresh" >&2; exit 2 ;;
esac
