#!/usr/bin/env python3
"""The README flow on the local cluster (`make local-up`), asserted end to end.

Run by `make local-test` (part of `make test`). Uses only kubectl, helm, curl and the
apiserver's audit log. Asserts:
  1. every workload of the chart is Ready (StatefulSet + three Deployments, all pods);
  2. the apiserver accepts manifests/queuescaler.yaml and rejects invalid QueueScalers
     (min > max via the CRD's CEL rule, a bad enum), evaluated by the real apiserver;
  3. a job POSTed through `kubectl port-forward svc/<release>-sender` gets 202 and a
     worker pod logs it as done;
  4. a burst scales the worker Deployment up; the scale writes come from the chart's
     controller ServiceAccount (audit log), which has no admin rights (`auth can-i`);
  5. `kubectl get qs` shows every printer column filled;
  6. on scale-in the ReplicaSet controller deletes the lowest pod-deletion-cost pods
     first, and no job is interrupted: no message redelivered, none dead-lettered;
     judged from a watch on the worker pods (every change in order: each pod's cost
     and readiness just before its deletion, and those of the pods kept);
  6b. the same during a scale-in with busy workers: with LONG jobs of LONG_DOTS seconds
     running on some of HOLD workers (the broker says which pods hold them), the
     controller marks the busy pods costlier, the ReplicaSet deletes idle pods and
     keeps the busy ones, and every long job is acked once, none redelivered;
  7. `helm test <release>` passes;
  8. with SCALERS QueueScalers polling every second on an empty queue of their own (nothing
     to change), the controller
     makes at most 0.1 apiserver requests per scaler per tick (apiserver_request_total over
     WINDOW seconds: targets come from its watch cache) and writes no /scale;
  9. with the chart's own Prometheus (metrics.prometheus.deploy=true, as `make local-e2e`
     installs it), `port-forward svc/<release>-prometheus 9090` shows every warren target
     up and the run's series (desired replicas, ready messages of `tasks`, jobs processed)
     queryable.
Settings (environment): KUBECONFIG, KUBECTL, HELM, RELEASE, NAMESPACE, LOCAL_STATE,
JOBS (40), DOTS (seconds of work per job, 3), HOLD (4), LONG (2), LONG_DOTS (40),
SCALERS (100), WINDOW (65), E2E_TIMEOUT (seconds per phase, 300).
"""
import base64
import codecs
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

KUBECTL = os.environ.get("KUBECTL", "kubectl")
HELM = os.environ.get("HELM", "helm")
RELEASE = os.environ.get("RELEASE", "warren")
NS = os.environ.get("NAMESPACE", "default")
STATE = os.environ["LOCAL_STATE"]
JOBS = int(os.environ.get("JOBS", "40"))
DOTS = int(os.environ.get("DOTS", "3"))
TIMEOUT = int(os.environ.get("E2E_TIMEOUT", "300"))
HOLD = int(os.environ.get("HOLD", "4"))
LONG = int(os.environ.get("LONG", "2"))
LONG_DOTS = int(os.environ.get("LONG_DOTS", "40"))
SCALERS = int(os.environ.get("SCALERS", "100"))
WINDOW = int(os.environ.get("WINDOW", "65"))
# The queue the idle QueueScalers of step 8 read: declared by the step, nothing publishes to it.
IDLE_QUEUE = "idle-probe"
WORKER = f"{RELEASE}-worker"
CONTROLLER_SA = f"system:serviceaccount:{NS}:{RELEASE}-controller"
COST = "controller.kubernetes.io/pod-deletion-cost"
BUSY_COST = 1000  # the controller's cost of a pod holding unacked jobs: 1000 + their count
WORKERS = "app.kubernetes.io/component=worker"
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    for args in (["get", "qs,deploy,sts,pods", "-o", "wide"],
                 ["get", "events", "--sort-by=.lastTimestamp"],
                 ["logs", f"deployment/{RELEASE}-controller", "--tail=60"]):
        subprocess.run([KUBECTL, "-n", NS, *args], check=False)
    sys.exit(1)


def k(*args, check=True, input=None):
    p = subprocess.run([KUBECTL, "-n", NS, *args], capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        fail(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return p


def kjson(*args):
    return json.loads(k(*args, "-o", "json").stdout)


def wait(what, pred, timeout=TIMEOUT, every=1.0):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            fail(f"{what}: not reached after {timeout}s")
        time.sleep(every)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortForward:
    def __init__(self, target, remote):
        self.port = free_port()
        self.proc = subprocess.Popen([KUBECTL, "-n", NS, "port-forward", target, f"{self.port}:{remote}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def up():
            if self.proc.poll() is not None:
                fail(f"port-forward {target} exited: {self.proc.stderr.read()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait(f"port-forward {target}", up, timeout=60)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


SEND_HEADERS = {"Content-Type": "application/json"}


def admin_call(port, admin_token, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def sender_token():
    """With auth.enabled (the chart's default) the sender wants a Bearer token: ask warren-admin
    for one, through port-forward, with the admin token from the chart's Secret."""
    if k("get", "deployment", f"{RELEASE}-admin", check=False).returncode != 0:
        return None
    admin_token = base64.b64decode(kjson("get", "secret", f"{RELEASE}-admin")["data"]["token"]).decode()
    admin = PortForward(f"svc/{RELEASE}-admin", 80)
    try:
        admin_call(admin.port, admin_token, "/api/applications", {"name": "local-e2e"})
        code, body = admin_call(admin.port, admin_token, "/api/tokens",
                                {"subject": {"kind": "application", "name": "local-e2e"},
                                 "limit": {"kind": "max_uses", "value": 10000}})
        if code >= 300 or not body.get("token"):
            fail(f"warren-admin POST /api/tokens: HTTP {code} {body}")
        return body["token"]
    finally:
        admin.close()


def post_job(port, message):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/send", method="POST",
                                 data=json.dumps({"message": message}).encode(), headers=SEND_HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def is_ready(pod):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def ready_pods(selector):
    pods = kjson("get", "pods", "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and is_ready(p)]


def check_workloads_ready():
    selector = f"app.kubernetes.io/instance={RELEASE}"
    workloads = kjson("get", "statefulsets,deployments", "-l", selector)["items"]
    names = sorted(f"{w['kind']}/{w['metadata']['name']}" for w in workloads)
    for must in (f"StatefulSet/{RELEASE}-rabbitmq", f"Deployment/{RELEASE}-sender",
                 f"Deployment/{RELEASE}-worker", f"Deployment/{RELEASE}-controller"):
        if must not in names:
            fail(f"{must} missing from the release: {names}")
    for w in workloads:
        want = w["spec"].get("replicas", 1)
        if w["status"].get("readyReplicas", 0) != want:
            fail(f"{w['kind']}/{w['metadata']['name']}: {w['status'].get('readyReplicas', 0)}/{want} ready")
    pods = kjson("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    not_ready = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running" and not is_ready(p)]
    if not_ready:
        fail(f"pods not Ready: {not_ready}")
    log(f"1. workloads Ready: {', '.join(names)}; {len(pods)} pods")


def cost_of(pod):
    return int(pod["metadata"].get("annotations", {}).get(COST, "0"))


class PodWatch:
    """Every worker pod deletion, judged from a watch on the worker pods (each change in
    resourceVersion order, so nothing falls between two polls): the deleted pod's deletion
    cost and readiness just before it started terminating, and those of the pods kept."""

    def __init__(self):
        self.proc = subprocess.Popen([KUBECTL, "-n", NS, "get", "pods", "-l", WORKERS, "--watch",
                                      "--output-watch-events", "-o", "json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lock = threading.Lock()
        self.live = {}       # name -> the pod's last state, while not terminating
        self.deletions = []  # dicts: at, name, cost, ready, kept {name: (cost, ready)}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        decoder, utf8, buf = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")(), ""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            buf += utf8.decode(chunk)
            while True:  # kubectl prints one JSON document per event
                buf = buf.lstrip()
                try:
                    event, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break
                buf = buf[end:]
                self._apply(event["type"], event["object"])

    def _apply(self, kind, pod):
        name = pod["metadata"]["name"]
        with self.lock:
            if kind in ("ADDED", "MODIFIED") and not pod["metadata"].get("deletionTimestamp"):
                self.live[name] = pod
                return
            before = self.live.pop(name, None)
            if before is None:
                return  # already counted when it started terminating
            self.deletions.append({
                "at": time.time(), "name": name, "cost": cost_of(before), "ready": is_ready(before),
                "kept": {n: (cost_of(q), is_ready(q)) for n, q in self.live.items()}})

    def snapshot(self):
        with self.lock:
            return dict(self.live), list(self.deletions)

    def check_alive(self):
        if self.proc.poll() is not None:
            fail(f"kubectl get pods --watch exited: {self.proc.stderr.read().decode()}")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


BATCH = 5.0  # seconds: deletions this close together come from one ReplicaSet sync


def kept_pods(d, deletions):
    """The pods of the deleted pod's readiness that the ReplicaSet kept: those live at the
    deletion and not deleted in the same batch (one scale-in deletes its victims together)."""
    batch = {e["name"] for e in deletions if abs(e["at"] - d["at"]) <= BATCH}
    return {n: c for n, (c, r) in d["kept"].items() if r == d["ready"] and n not in batch}


def check_victims(deletions, step):
    """The ReplicaSet ranks not-Ready pods before Ready ones and only then by deletion
    cost: no kept pod of the deleted pod's readiness may be cheaper than it."""
    for d in deletions:
        kept = kept_pods(d, deletions)
        cheaper_kept = {n: c for n, c in kept.items() if c < d["cost"]}
        if cheaper_kept:
            fail(f"ReplicaSet deleted {d['name']} (cost {d['cost']}) but kept cheaper pods {cheaper_kept}")
        log(f"{step}. deleted {d['name']} at {d['at'] - T0:.1f}s (deletion cost {d['cost']}, "
            f"{'Ready' if d['ready'] else 'not Ready'}); kept {kept}")


def check_crd_validation():
    manifest = open("manifests/queuescaler.yaml").read()
    bad = {
        "minReplicas > maxReplicas (CEL rule)": (
            manifest.replace("minReplicas: 0", "minReplicas: 11"), "maxReplicas must be greater than or equal to minReplicas"),
        "bad enum selectPolicy": (
            manifest.replace("selectPolicy: Max            # at most half", "selectPolicy: Sometimes  # at most half"),
            "Unsupported value"),
    }
    for what, (doc, expected) in bad.items():
        if doc == manifest:
            fail(f"could not build the invalid QueueScaler for {what}")
        p = k("apply", "--dry-run=server", "-f", "-", input=doc, check=False)
        if p.returncode == 0 or expected not in p.stderr:
            fail(f"apiserver accepted an invalid QueueScaler ({what}): rc={p.returncode} {p.stderr.strip()}")
        line = next(ln for ln in p.stderr.splitlines() if expected in ln)
        log(f"2. apiserver rejected {what}: {line.strip()[:200]}")
    k("apply", "-f", "manifests/queuescaler.yaml")
    log("2. apiserver accepted manifests/queuescaler.yaml")


def worker_replicas():
    return kjson("get", "deployment", WORKER)["spec"].get("replicas", 0)


def check_rbac():
    yes = [("patch", "deployments.apps", "--subresource=scale", "-n", NS), ("get", "queuescalers.warren.dev", "-n", NS)]
    no = [("create", "clusterrolebindings"), ("delete", "nodes"), ("get", "secrets", "-n", "kube-system"),
          ("patch", "deployments.apps", "-n", NS)]
    for check in yes + no:
        p = subprocess.run([KUBECTL, "auth", "can-i", *check, "--as", CONTROLLER_SA], capture_output=True, text=True)
        allowed = p.stdout.strip() == "yes"
        if allowed != (check in yes):
            fail(f"{CONTROLLER_SA} can-i {' '.join(check)}: {p.stdout.strip()}")
    pod = kjson("get", "pods", "-l", "app.kubernetes.io/component=controller")["items"][0]
    if pod["spec"].get("serviceAccountName") != f"{RELEASE}-controller":
        fail(f"controller pod runs as {pod['spec'].get('serviceAccountName')}")
    log(f"4. controller runs as {CONTROLLER_SA}; RBAC lets it scale, not administer")


def audit_scalers():
    """Identities that wrote the worker Deployment's scale subresource, from the audit log."""
    users = set()
    with open(os.path.join(STATE, "logs", "audit.log")) as f:
        for line in f:
            ev = json.loads(line)
            ref = ev.get("objectRef", {})
            if ref.get("resource") == "deployments" and ref.get("subresource") == "scale" \
                    and ref.get("name") == WORKER and ev.get("verb") in ("patch", "update") \
                    and ev.get("stage") == "ResponseComplete" and ev.get("responseStatus", {}).get("code", 0) < 300:
                users.add(ev["user"]["username"])
    return users


def check_printer_columns():
    out = k("get", "qs").stdout.splitlines()
    header = re.split(r"\s{2,}", out[0].strip())
    row = re.split(r"\s{2,}", out[1].strip())
    if len(row) != len(header) or any(c in ("", "<none>") for c in row):
        fail(f"kubectl get qs: columns not all filled:\n" + "\n".join(out))
    log(f"5. kubectl get qs: {dict(zip(header, row))}")


def rabbit_queue(port, user, password, name):
    try:
        return rabbit_get(port, user, password, f"/api/queues/%2F/{name}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def queue_counters(mgmt, user, password):
    stats = (rabbit_queue(mgmt.port, user, password, "tasks") or {}).get("message_stats", {})
    return {"redeliver": stats.get("redeliver", 0), "ack": stats.get("ack", 0)}


def check_no_redelivery(mgmt, user, password, before, step):
    redelivered = queue_counters(mgmt, user, password)["redeliver"] - before["redeliver"]
    dead = (rabbit_queue(mgmt.port, user, password, "tasks.dead") or {}).get("messages", 0)
    if redelivered or dead:
        fail(f"jobs interrupted: {redelivered} redelivered, {dead} dead-lettered")
    log(f"{step}. no job interrupted: 0 redelivered, 0 dead-lettered")


def rabbit_get(port, user, password, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def busy_pods(mgmt, user, password):
    """Pods holding unacked deliveries, from the broker: a worker names its AMQP
    connection after its pod."""
    conns = rabbit_get(mgmt.port, user, password, "/api/connections?columns=name,user_provided_name")
    names = {c["name"]: c.get("user_provided_name") for c in conns}
    chans = rabbit_get(mgmt.port, user, password, "/api/channels?columns=connection_details.name,messages_unacknowledged")
    busy = {}
    for ch in chans:
        pod = names.get(ch.get("connection_details", {}).get("name"))
        if pod and ch.get("messages_unacknowledged", 0):
            busy[pod] = busy.get(pod, 0) + ch["messages_unacknowledged"]
    return busy


def scaler_name():
    return kjson("apply", "--dry-run=client", "-f", "manifests/queuescaler.yaml")["metadata"]["name"]


def check_busy_scale_in(watch, sender, mgmt, user, password):
    """6b. A scale-in while some workers run long jobs: HOLD idle workers (minReplicas),
    LONG jobs of LONG_DOTS seconds, then minReplicas 1 with no scale-down stabilization,
    so the controller scales in (by half per 30 s) while the jobs run. minReplicas 1, not 0:
    the queue was empty for longer than the cooldown, and the management API's queue
    counts lag the deliveries by up to its stats interval, so with minReplicas 0 the first
    tick may see an empty queue and go to zero at once (every pod deleted: no choice left
    to the ReplicaSet)."""
    qs = scaler_name()
    k("patch", "qs", qs, "--type", "merge", "-p", json.dumps({"spec": {"minReplicas": HOLD}}))

    def held():
        live, _ = watch.snapshot()
        q = rabbit_queue(mgmt.port, user, password, "tasks") or {}
        terminating = [p for p in kjson("get", "pods", "-l", WORKERS)["items"] if p["metadata"].get("deletionTimestamp")]
        return (worker_replicas() == HOLD and len(live) == HOLD and not terminating
                and all(is_ready(p) for p in live.values())
                and q.get("messages", 1) == 0 and q.get("messages_unacknowledged", 1) == 0)
    wait(f"{HOLD} idle Ready workers (minReplicas {HOLD})", held)
    # The scale-down policy allows 50% per 30 s: let the period of the last scale-in pass.
    _, deletions = watch.snapshot()
    if deletions:
        time.sleep(max(0.0, deletions[-1]["at"] + 31 - time.time()))
    before = queue_counters(mgmt, user, password)
    for i in range(LONG):
        code = post_job(sender.port, f"long job {i} {'.' * LONG_DOTS}")
        if code != 202:
            fail(f"long job {i}: HTTP {code}")
    busy = wait(f"{LONG} workers busy with the long jobs (broker's unacked per connection)",
                lambda: (b := busy_pods(mgmt, user, password)) and len(b) == LONG and b, timeout=60, every=0.5)
    live, _ = watch.snapshot()
    if not set(busy) <= set(live):
        fail(f"the broker's busy connections {sorted(busy)} are not worker pods {sorted(live)}")
    idle = sorted(set(live) - set(busy))
    oldest = sorted(live, key=lambda n: live[n]["metadata"]["creationTimestamp"])
    log(f"6b. busy with long jobs: {sorted(busy)}; idle: {idle}; pods oldest first: {oldest}")
    start = time.time()
    k("patch", "qs", qs, "--type", "merge", "-p", json.dumps(
        {"spec": {"minReplicas": 1, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}}))

    def jobs_done():
        watch.check_alive()
        q = rabbit_queue(mgmt.port, user, password, "tasks") or {}
        acked = queue_counters(mgmt, user, password)["ack"] - before["ack"]
        return acked >= LONG and q.get("messages", 1) == 0 and q.get("messages_unacknowledged", 1) == 0
    wait("the long jobs acked", jobs_done, timeout=LONG_DOTS + TIMEOUT, every=1)
    _, deletions = watch.snapshot()
    during = [d for d in deletions if d["at"] >= start]
    check_victims(during, "6b")
    # Judged by the broker, independently of the costs: while idle workers were left, no
    # busy one was deleted; and at least one idle worker went while busy ones stayed.
    idle_for_busy = 0
    for d in during:
        kept = set(kept_pods(d, deletions))
        if d["name"] in busy and kept - set(busy):
            fail(f"ReplicaSet deleted busy pod {d['name']} while idle pods {sorted(kept - set(busy))} were kept")
        if d["name"] not in busy and kept & set(busy):
            idle_for_busy += 1
            marks = {n: d["kept"][n][0] for n in kept & set(busy)}
            if d["cost"] >= BUSY_COST or any(c < BUSY_COST for c in marks.values()):
                fail(f"deletion costs not marked by busyness: deleted idle {d['name']} cost {d['cost']}, "
                     f"busy pods kept {marks}")
    if not idle_for_busy:
        fail(f"no idle worker deleted while the long jobs ran on {sorted(busy)}: deletions {during}")
    acked = queue_counters(mgmt, user, password)["ack"] - before["ack"]
    if acked != LONG:
        fail(f"{LONG} long jobs, {acked} acks")
    log(f"6b. scale-in during the long jobs: {idle_for_busy} idle pods deleted, busy pods kept "
        f"(cost >= {BUSY_COST}); {acked} long jobs acked once each")
    check_no_redelivery(mgmt, user, password, before, "6b")
    k("apply", "-f", "manifests/queuescaler.yaml")


def apiserver_counts():
    """apiserver_request_total from the apiserver's own /metrics, summed by
    (verb, resource, subresource)."""
    counts = {}
    for line in k("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def controller_reconciles(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("warren_controller_reconciles_total{"))


# What the controller asks of the apiserver per tick: its scalers, its targets' /scale,
# the broker Secret, Events, the pods it annotates (nothing else in this cluster touches
# these in a steady state; watches are long-lived and not counted per tick).
def controller_request(verb, resource, subresource):
    if verb == "WATCH":
        return False
    return (resource == "queuescalers" or subresource == "scale" or resource == "events"
            or (resource == "secrets" and verb == "GET") or (resource == "pods" and verb in ("LIST", "PATCH")))


def rabbit_put(port, user, password, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="PUT", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def check_requests_per_tick(user, password):
    """8. SCALERS QueueScalers polling every second with nothing to change: the controller's
    apiserver requests per scaler per tick (apiserver_request_total over WINDOW seconds)
    stay at or below 0.1 (targets come from its watch cache), and it writes no /scale."""
    target = "idle-target"
    manifest = json.loads(k("apply", "--dry-run=client", "-f", "manifests/queuescaler.yaml", "-o", "json").stdout)
    # The README's scaler would still scale the workers in (its cooldown): only idle ones measured.
    k("delete", "-f", "manifests/queuescaler.yaml")
    # The idle scalers read a queue of their own that nothing publishes to. On `tasks` a job
    # left by an earlier step (helm test's, once the README's scaler is gone) kept the
    # scalers' observations moving: every scaler patched its status every tick.
    mgmt = PortForward(f"svc/{RELEASE}-rabbitmq", 15672)
    rabbit_put(mgmt.port, user, password, f"/api/queues/%2F/{IDLE_QUEUE}", {"durable": True})
    mgmt.close()
    items = [{
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": target, "labels": {"app": target}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": target}},
                 "template": {"metadata": {"labels": {"app": target}},
                              "spec": {"containers": [{"name": "w", "image": "warren-worker:0.1.0"}]}}}}]
    for i in range(SCALERS):
        qs = json.loads(json.dumps(manifest))
        qs["metadata"] = {"name": f"idle-{i}"}
        qs["spec"]["scaleTargetRef"]["name"] = target
        qs["spec"]["queue"] = {"name": IDLE_QUEUE, "vhost": "/"}
        qs["spec"]["pollingIntervalSeconds"] = 1
        qs["spec"]["maxReplicas"] = 1
        qs["spec"]["fallback"]["replicas"] = 1
        items.append(qs)
    k("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def settled():
        scalers = [q for q in kjson("get", "qs")["items"] if q["metadata"]["name"].startswith("idle-")]
        return len(scalers) == SCALERS and all(
            (q.get("status") or {}).get("currentReplicas") == 0 and (q.get("status") or {}).get("observation")
            for q in scalers)
    wait(f"{SCALERS} idle QueueScalers observed by the controller", settled, every=2)
    pod = kjson("get", "pods", "-l", "app.kubernetes.io/component=controller")["items"][0]["metadata"]["name"]
    metrics = PortForward(f"pod/{pod}", 8080)
    time.sleep(5)
    before, ticks_before, t = apiserver_counts(), controller_reconciles(metrics.port), time.time()
    time.sleep(WINDOW)
    after, ticks_after, elapsed = apiserver_counts(), controller_reconciles(metrics.port), time.time() - t
    metrics.close()
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] > before.get(key, 0)}
    ours = {key: n for key, n in delta.items() if controller_request(*key)}
    others = sum(n for key, n in delta.items() if key not in ours and key[0] != "WATCH")
    ticks = ticks_after - ticks_before
    requests = sum(ours.values())
    per_tick = requests / ticks if ticks else float("inf")
    log(f"8. {SCALERS} scalers, {elapsed:.0f}s: {ticks:.0f} reconciles ({ticks / elapsed / SCALERS:.2f} per scaler per s), "
        f"{requests:.0f} controller requests -> {per_tick:.4f} per scaler per tick; by request: "
        + ", ".join(f"{v} {r}{'/' + s if s else ''}={n:.0f}" for (v, r, s), n in sorted(ours.items()))
        + f"; everything else in the cluster: {others:.0f}")
    if ticks < SCALERS * elapsed / 4:
        fail(f"only {ticks:.0f} reconciles of {SCALERS} scalers polling every second in {elapsed:.0f}s")
    if per_tick > 0.1:
        fail(f"{per_tick:.3f} apiserver requests per scaler per tick with nothing changing (bar: 0.1)")
    scale_writes = sum(n for (v, r, s), n in ours.items() if s == "scale" and v != "GET")
    if scale_writes:
        fail(f"{scale_writes:.0f} /scale writes with nothing to change")
    k("delete", "qs", *[f"idle-{i}" for i in range(SCALERS)], "--wait=false")
    k("delete", "deployment", target)


def prometheus_get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
        return json.loads(r.read())


def check_prometheus(with_admin):
    if k("get", "service", f"{RELEASE}-prometheus", check=False).returncode != 0:
        log("9. no in-chart Prometheus (metrics.prometheus.deploy=false): not checked")
        return
    prom = PortForward(f"svc/{RELEASE}-prometheus", 9090)
    want = {"sender", "worker", "controller", "rabbitmq", "rabbitmq-queues"} | ({"admin"} if with_admin else set())
    state = {}

    def targets_up():
        try:
            targets = prometheus_get(prom.port, "/api/v1/targets?state=active")["data"]["activeTargets"]
        except OSError as e:
            state["error"] = e
            return False
        state["up"] = sorted({t["labels"].get("warren_component") for t in targets if t["health"] == "up"})
        state["down"] = [(t["labels"].get("warren_component"), t["scrapeUrl"], t.get("lastError"))
                         for t in targets if t["health"] != "up"]
        return want <= set(state["up"]) and not state["down"]
    deadline = time.time() + 120
    while not targets_up():
        if time.time() > deadline:
            fail(f"Prometheus targets after 120s: up {state.get('up')}, wanted {sorted(want)}, "
                 f"not up {state.get('down')}, last error {state.get('error')}")
        time.sleep(3)
    log(f"9. Prometheus (port-forward svc/{RELEASE}-prometheus 9090): targets up: {', '.join(state['up'])}")
    for query in ("max_over_time(warren_controller_scaler_desired_replicas[30m])",
                  'max_over_time(rabbitmq_detailed_queue_messages_ready{queue="tasks"}[30m])',
                  "warren_worker_jobs_processed_total"):
        result = prometheus_get(prom.port, "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        series = result["data"]["result"]
        if not series:
            fail(f"Prometheus: no data for {query}")
        log(f"9. {query}: {len(series)} series, e.g. {series[0]['value'][1]}")
    prom.close()


def main():
    check_workloads_ready()
    check_crd_validation()
    check_rbac()

    token = sender_token()
    if token:
        SEND_HEADERS["Authorization"] = f"Bearer {token}"
        log("3. token for the sender created through warren-admin's API")
    sender = PortForward(f"svc/{RELEASE}-sender", 80)
    marker = f"local-e2e marker {int(time.time())}."
    code = post_job(sender.port, marker)
    if code != 202:
        fail(f"POST /send through port-forward: HTTP {code}")

    def marker_done():
        for p in ready_pods("app.kubernetes.io/component=worker"):
            logs = k("logs", p["metadata"]["name"], check=False).stdout
            if marker in logs and "job done" in logs:
                return p["metadata"]["name"]
        return None
    pod = wait("the marker job processed by a worker", marker_done, every=2)
    log(f"3. job POSTed through port-forward (202) done by worker pod {pod}")

    sec = kjson("get", "secret", f"{RELEASE}-rabbitmq")["data"]
    user, password = (base64.b64decode(sec[x]).decode() for x in ("username", "password"))
    mgmt = PortForward(f"svc/{RELEASE}-rabbitmq", 15672)
    before = queue_counters(mgmt, user, password)

    suffix = "." * DOTS
    codes = [post_job(sender.port, f"burst job {i}{suffix}") for i in range(JOBS)]
    if codes.count(202) != JOBS:
        fail(f"burst: {codes.count(202)} of {JOBS} accepted with 202")
    log(f"sent {JOBS} jobs of {DOTS}s, all 202")

    watch = PodWatch()
    peak = wait("worker scale-up above 1", lambda: (r := worker_replicas()) > 1 and r)
    log(f"4. workers scaled up to {peak}")
    wait("the pod watch sees the worker pods", lambda: (watch.check_alive(), len(watch.snapshot()[0]) >= 1)[1],
         timeout=60)
    users = audit_scalers()
    if users != {CONTROLLER_SA}:
        fail(f"worker Deployment's scale written by {users}, expected only {CONTROLLER_SA}")
    log(f"4. audit log: deployments/{WORKER}/scale written only by {CONTROLLER_SA}")
    check_printer_columns()

    # Scale-in: every worker pod the ReplicaSet deletes must carry the lowest deletion
    # cost among the pods of its readiness that it keeps.
    deadline = time.time() + 2 * TIMEOUT
    while True:
        watch.check_alive()
        live, _ = watch.snapshot()
        q = rabbit_queue(mgmt.port, user, password, "tasks") or {}
        replicas = worker_replicas()
        peak = max(peak, replicas)
        if q.get("messages", 1) == 0 and replicas < peak and len(live) <= replicas:
            break
        if time.time() > deadline:
            fail(f"no scale-in below {peak} with an empty queue after {2 * TIMEOUT}s")
        time.sleep(0.5)
    _, decisions = watch.snapshot()
    log(f"6. scaled in to {worker_replicas()} from a peak of {peak}; {len(decisions)} pod deletions observed")
    if not decisions:
        fail("no worker pod deletion observed during the scale-in")
    check_victims(decisions, 6)

    wait("the terminating workers gone", lambda: not any(
        p["metadata"].get("deletionTimestamp") for p in kjson("get", "pods", "-l", WORKERS)["items"]))
    check_no_redelivery(mgmt, user, password, before, 6)

    check_busy_scale_in(watch, sender, mgmt, user, password)
    watch.close()
    mgmt.close()
    sender.close()

    p = subprocess.run([HELM, "test", RELEASE, "-n", NS, "--timeout", "3m"], capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"helm test {RELEASE}: {p.stdout}{p.stderr}")
    log(f"7. helm test {RELEASE} passed")
    check_requests_per_tick(user, password)
    check_prometheus(with_admin=token is not None)
    log("local e2e passed")


if __name__ == "__main__":
    main()
